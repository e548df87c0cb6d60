"""demo.sh's care for a DEMO_DIR it did not make (the demo itself runs in the Quick start, not in the suite)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_existing_demo_dir_is_left_alone(tmp_path):
    """DEMO_DIR=<a directory of the user's> deleted its work/ and rewrote its data/*.txt."""
    mine = tmp_path / 'mine'
    (mine / 'work').mkdir(parents=True)
    (mine / 'work' / 'precious.txt').write_text('keep me')
    (mine / 'data').mkdir()
    (mine / 'data' / 'train.txt').write_text('my corpus')
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob('*'))
    r = subprocess.run(['bash', str(ROOT / 'demo.sh')], env=dict(os.environ, DEMO_DIR=str(mine)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert f'DEMO_DIR {mine} already holds files that demo.sh did not make' in r.stderr
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob('*')) == before
    assert (mine / 'work' / 'precious.txt').read_text() == 'keep me'
