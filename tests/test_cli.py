"""The ``vxpu`` command line: parser wiring and error reporting."""

import subprocess
import sys

from vxpu import cli


def test_help_lists_commands(capsys):
    parser = cli.build_parser()
    parser.print_help()
    assert "vxpu" in capsys.readouterr().out


def test_version_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "vxpu", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("vxpu ")
