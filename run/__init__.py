"""The run layer: what a script does with a model and a corpus (train, evaluate, generate, read and write
model files, upcycle, import, run under torchrun). It sits above the model (moe.py, mem_transformer.py) and
the data (data_utils.py), which sit above the leaf helpers in utils/."""
