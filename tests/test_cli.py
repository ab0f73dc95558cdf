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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_option_is_one_line_naming_it(command, capsys):
    """Every command, whatever parses it, answers a misspelt option in one line (exit 2), not a usage dump."""
    assert main([command, "--no_such_option", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"falcon-qlora {command}: error:")
    assert "no_such_option" in err[0] or "required: --" in err[0]  # argparse names a missing option first


@pytest.mark.parametrize("command,option", [("chat", "max_new_tokens"), ("eval", "max_rows"), ("merge", "push_to_hub"),
                                            ("export", "allow_other_base"), ("serve", "api_key")])
def test_options_are_spelled_with_underscores_and_hyphens_also_work(command, option, capsys):
    """One spelling across commands, as in the run config (--max_length); the hyphenated one is an alias."""
    try:
        main([command, "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert f"--{option}" in out and f"--{option.replace('_', '-')}" in out
