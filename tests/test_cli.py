"""The `hfgpt` command as a new user first meets it: every subcommand's --help, and no alarming noise."""

import json
import os
import subprocess
import sys
import textwrap

# In a fresh process, as a user runs it: every command's --help (and every evaluation's), the help text it printed,
# then bitsandbytes imported as a QLoRA run imports it -- its offline warnings about an optional CPU kernel must not
# reach the user.
CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from hfgpt.cli import COMMANDS, main
    from hfgpt.evaluation.cli import EVALUATIONS

    results = {}
    for argv in [[name, "--help"] for name in COMMANDS] + [["eval", name, "--help"] for name in EVALUATIONS]:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except Exception as error:
            code = f"{type(error).__name__}: {error}"
        results[" ".join(argv)] = {"code": code, "help": out.getvalue()}
    # PEFT before 0.22 imports bitsandbytes with Trainer, later versions when 4-bit weights are first used (a QLoRA
    # run): import it here either way, as such a run would
    import bitsandbytes  # noqa: F401
    print(json.dumps({"results": results, "bitsandbytes_imported": "bitsandbytes" in sys.modules}))
    """
)


def test_every_subcommand_help_works_and_prints_no_bitsandbytes_warning(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert {"classify --help", "pretrain --help", "eval perplexity --help"} <= set(results)
    for argv, result in results.items():
        assert result["code"] in (0, None), (argv, result["code"])
        assert "usage:" in result["help"] and "--" in result["help"], (argv, result["help"][-500:])
    assert "--validation_split_percentage percent" in results["classify --help"]["help"]
    # the warnings come when bitsandbytes is imported: it was, and nothing of them was printed
    assert report["bitsandbytes_imported"]
    for noise in ("gemm_4bit_forward", "kernels-community"):
        assert noise not in done.stderr and noise not in done.stdout, done.stderr[-3000:]


def test_other_bitsandbytes_warnings_still_show(caplog):
    import logging

    import hfgpt  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
        logger.warning("something else went wrong")
    assert [record.getMessage() for record in caplog.records] == ["something else went wrong"]


def test_version(capsys):
    import torch
    import transformers

    import hfgpt
    from hfgpt.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == (f"hfgpt {hfgpt.__version__} (torch {torch.__version__}, "
                                               f"transformers {transformers.__version__})")


def test_help_lists_every_command_with_a_line_and_points_to_the_docs(capsys):
    from hfgpt.cli import COMMANDS, DOCS, main

    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (_, _, help_) in COMMANDS.items():
        assert any(line.split()[:1] == [name] and help_ in line for line in lines), name
    pointer = [line for line in lines if line.startswith("documentation: ")]
    assert pointer and str(DOCS) in pointer[0] and DOCS.is_file()
