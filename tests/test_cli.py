"""The glm-serve command line: delegated subcommands and the memory check before serving."""

from server.cli import build_parser, fits_before_loading, main
from server.config import load_config


def test_plan_subcommand_exit_codes(capsys):
    assert main(["plan", "--profile", "nvidia-h200", "--model", "glm-5"]) == 0
    assert main(["plan", "--profile", "nvidia-a100", "--model", "glm-5"]) == 1
    assert "GLM-5" in capsys.readouterr().out


def test_serve_refuses_a_model_that_cannot_fit(capsys):
    assert fits_before_loading(load_config("cpu"))
    assert not fits_before_loading(load_config("nvidia-a100", {"engine.model": "glm-5"}))
    assert "does not fit" in capsys.readouterr().err


def test_parser_lists_every_subcommand():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"serve", "plan", "bench", "tiny-glm5"} <= set(commands)
