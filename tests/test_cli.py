"""The command line: every command answers --help with its own name, and unknown commands are one clear error."""
import pytest

from falcon_qlora.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    assert f"falcon-qlora {command}" in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "demo" in err
