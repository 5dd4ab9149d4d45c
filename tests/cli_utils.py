"""Running `smsanet-jax` in the test process and reading what the user sees."""

import os

import pytest
from PIL import Image
from skimage import data as skdata

from smsanet_jax import cli


def run_cli(capsys, argv):
    """`smsanet-jax ARGV` in this process: (exit status, what it printed on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    return exited.value.code, capsys.readouterr().err


def one_error_line(err):
    """The command's error line: there must be exactly one, and no traceback."""
    assert "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if " error: " in l]
    return line


def photo_folder(path, names=("astronaut", "chelsea", "coffee")):
    """A folder of real colour photos (scikit-image's), as PNG files."""
    os.makedirs(path, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(skdata, name)()).save(os.path.join(path, f"{name}.png"))
    return str(path)
