"""The ``tune`` command on CPU: --help, --list, --analytic and argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flashoverlap.plan import PlanConfig, Problem
from flashoverlap.tuning import cache
from flashoverlap import collectives
from flashoverlap.tuning.cli import format_groups, format_table, tune


@pytest.fixture
def runner(tmp_path: Path, monkeypatch) -> CliRunner:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    return CliRunner()


def test_help(runner):
    result = runner.invoke(tune, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ("-M", "-N", "-K", "--op", "--dtype", "--world-size", "--top-k", "--list"):
        assert option in result.output


def _torchrun_line(help_text: str) -> list[str]:
    import shlex

    line = next(x for x in help_text.splitlines() if x.strip().startswith("torchrun "))
    return shlex.split(line)[1:]


def test_help_example_gets_through_torchrun(runner):
    """torchrun parses the whole command line, and took --m/--n for its own options
    ("ambiguous option: --m could match --max-restarts, ...").  The example in the help must
    reach flashoverlap intact, and flashoverlap must accept what arrives."""
    run = pytest.importorskip("torch.distributed.run")
    main = pytest.importorskip("flashoverlap.cli").main
    argv = _torchrun_line(runner.invoke(main, ["tune", "--help"]).output)
    args = run.get_args_parser().parse_args(argv)
    assert args.module and args.training_script == "flashoverlap.cli"
    assert args.training_script_args[:1] == ["tune"] and "-M" in args.training_script_args
    # what flashoverlap then sees (model-only, so it runs here)
    result = runner.invoke(main, [*args.training_script_args, "--world-size",
                                  str(args.nproc_per_node), "--analytic"])
    assert result.exit_code == 0, result.output
    assert "analytic model" in result.output
    # the old spelling is what torchrun rejects (the reason for -M/-N/-K)
    with pytest.raises(SystemExit):
        run.get_args_parser().parse_args(
            ["--nproc-per-node", "4", "-m", "flashoverlap.cli", "tune", "--m", "8192"])


def test_old_and_long_spellings_give_the_same_answer(runner):
    common = ["--world-size", "4", "--analytic", "--top-k", "3"]
    outputs = [runner.invoke(tune, dims + common).output for dims in (
        ["-M", "4096", "-N", "2048", "-K", "1024"],
        ["--rows", "4096", "--cols", "2048", "--inner", "1024"],
        ["--m", "4096", "--n", "2048", "--k", "1024"],
    )]
    assert "analytic model" in outputs[0]
    assert outputs[0] == outputs[1] == outputs[2]
    result = runner.invoke(tune, ["-M", "8", "--m", "16", "-N", "8", "-K", "8"] + common)
    assert result.exit_code == 2 and "disagree" in result.output


def test_tuning_without_a_gpu_is_a_clear_error(runner):
    """Was a raw ``AssertionError: Torch not compiled with CUDA enabled`` traceback."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(tune, ["-M", "64", "-N", "64", "-K", "64"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a click error, not a traceback
    assert "cannot tune on this machine: no CUDA GPU" in result.output
    assert "--analytic" in result.output
    assert not dist.is_initialized()  # refused before starting a process group


def test_mounted_on_main_cli(runner):
    main = pytest.importorskip("flashoverlap.cli").main
    result = runner.invoke(main, ["tune", "--help"])
    assert result.exit_code == 0, result.output
    assert "--top-k" in result.output


def test_list_empty(runner, tmp_path):
    result = runner.invoke(tune, ["--list"])
    assert result.exit_code == 0, result.output
    assert "no tuned configs" in result.output and str(tmp_path) in result.output


def test_list_entries(runner, tmp_path):
    for M, overlap in ((8192, True), (64, False)):
        problem = Problem(M, 8192, 2048, "bfloat16", 4, "all_reduce")
        key = cache.make_key(problem, gpu_name="NVIDIA H100", num_sms=132,
                             interconnect="nvlink", nccl_version="2.21.5")
        config = PlanConfig(num_ctas=116, group_bands=(1, 1, 2, 2, 2) if M == 8192 else (1,))
        cache.store(key, config, predicted_ms=1.234, measured_ms=1.3 if overlap else None,
                    sequential_ms=1.5, use_overlap=overlap)
    (tmp_path / "tuning" / "broken.json").write_text("{not json")
    with pytest.warns(cache.CacheWarning):
        result = runner.invoke(tune, ["--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["gpu", "W", "op", "dtype"]
    assert len(lines) == 4  # header, rule, two entries (the broken file is skipped)
    assert "1x2,2x3" in result.output and "1.234" in result.output
    assert lines[2].split()[-1] == "no" and lines[3].split()[-1] == "yes"  # sorted by M


def test_op_choices_are_the_registered_collectives(runner):
    result = runner.invoke(tune, ["--help"])
    for name in collectives.registered():
        assert name in result.output
    result = runner.invoke(tune, ["--m", "8", "--n", "8", "--k", "8", "--world-size", "2",
                                  "--analytic", "--op", "all_gather_nope"])
    assert result.exit_code == 2 and "all_gather_nope" in result.output


def test_analytic(runner):
    result = runner.invoke(tune, ["--m", "8192", "--n", "8192", "--k", "2048",
                                  "--world-size", "4", "--analytic", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "sequential (predicted)" in result.output and "-> overlap" in result.output
    assert "untuned engine default: tile 128x256, P 116" in result.output
    result = runner.invoke(tune, ["--m", "64", "--n", "8192", "--k", "2048", "--world-size",
                                  "4", "--analytic", "--op", "reduce_scatter"])
    assert result.exit_code == 0, result.output
    assert "-> sequential" in result.output
    assert result.output.rstrip().endswith("-> sequential")  # the engine would not overlap
    # A small problem: the engine's default takes 128 x 128 tiles (kernels.wave_tile)
    result = runner.invoke(tune, ["-M", "2048", "-N", "4096", "-K", "1024", "--world-size",
                                  "8", "--analytic"])
    assert result.exit_code == 0, result.output
    assert "untuned engine default: tile 128x128, P 116" in result.output


@pytest.mark.parametrize("args, message", [
    (["--n", "1", "--k", "1"], "-M, -N and -K are required"),
    (["--m", "1", "--n", "1", "--k", "1", "--analytic"], "--world-size"),
    (["--m", "6", "--n", "8", "--k", "8", "--world-size", "4", "--op", "reduce_scatter",
      "--analytic"], "divisible"),
    (["--m", "8", "--n", "8", "--k", "8", "--tiles", "128", "--analytic", "--world-size", "2"],
     "BMxBN"),
    (["--m", "8", "--n", "8", "--k", "8", "--reservations", "a,b", "--analytic",
      "--world-size", "2"], "integers"),
    (["--m", "0", "--n", "8", "--k", "8"], "x>=1"),
])
def test_usage_errors(runner, args, message):
    result = runner.invoke(tune, args)
    assert result.exit_code == 2
    assert message in result.output


def test_missing_backend_is_a_clear_error(runner):
    result = runner.invoke(tune, ["--m", "8", "--n", "8", "--k", "8",
                                  "--backend", "flashoverlap_no_such_module:factory"])
    assert result.exit_code == 1
    assert "cannot import the tuning backend" in result.output


def test_formatting_helpers():
    assert format_groups((1, 1, 2, 2, 2, 7)) == "1x2,2x3,7"
    assert format_groups(None) == "per-band"
    table = format_table(("a", "bb"), [(1, None), (333, "x")])
    assert table.splitlines() == ["  a  bb", "---  --", "  1   -", "333   x"]
