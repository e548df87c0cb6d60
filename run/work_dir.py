"""The run directory: refuse to mix a new run into another one's, then claim it for this run."""
import os

from utils import checkpoint as ckpt
from utils import files
from utils.errors import ConfigError, UserError


def check_work_dir(config):
    """Refuse to mix a new run into a directory that holds another one; --restart needs a checkpoint."""
    checkpoint_path = os.path.join(config.work_dir, 'checkpoint.pt')
    if not config.debug:
        files.check_writable_dir(config.work_dir, '--work_dir')
    if config.restart_dir:
        if not os.path.isfile(os.path.join(config.restart_dir, 'model.pt')):
            raise ConfigError(f'--restart_dir {config.restart_dir} holds no model.pt to start from')
        if os.path.abspath(config.restart_dir) == os.path.abspath(config.work_dir):
            raise ConfigError('--restart_dir is another run to start from; to resume this run use --restart')
    elif config.restart:
        if not os.path.isfile(checkpoint_path):
            raise ConfigError(f'--restart: {checkpoint_path} does not exist (nothing to resume; drop --restart '
                             'to start a new run)')
        return
    if not config.debug:
        for name in ('checkpoint.pt', 'model.pt'):
            if os.path.exists(os.path.join(config.work_dir, name)):
                raise ConfigError(f'--work_dir {config.work_dir} already holds a run ({name}): pass --restart to '
                                 'resume it or choose another --work_dir')


def claim_work_dir(config, dist, notes):
    """Once every check has passed: create the run directory and lock it for this run (torchrun's processes
    are one run: rank 0 holds the lock), then remove the temporary files of a run killed while writing.
    Returns the lock, to be kept for the whole run (None in debug mode)."""
    if config.debug:
        return None
    lock, error = None, None
    if dist.is_main:
        try:
            os.makedirs(config.work_dir, exist_ok=True)
            lock = files.lock_directory(config.work_dir, '--work_dir')
            check_work_dir(config)  # again under the lock: another run may have started here meanwhile
            removed = files.remove_orphans(config.work_dir, ckpt.RUN_FILES, extra=(ckpt.PENDING,))
            if removed:
                notes.append(f'Removed the temporary files of an interrupted run: {", ".join(removed)}')
        except (UserError, OSError) as e:
            error = str(e)
    error = dist.gather_objects(error)[0]  # every rank stops if rank 0 could not claim the directory
    if error:
        raise ConfigError(error)
    return lock
