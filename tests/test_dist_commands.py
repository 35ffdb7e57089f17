"""Commands without sharding refuse torchrun's process group instead of running once per process
into the same output."""

from __future__ import annotations

import pytest

from smix.cli import run


@pytest.mark.parametrize("command,argv,advice", [
    ("transfer", ["--ckpt", "{t}/m.safetensors", "--voc-root", "{t}/voc", "--out", "{t}/out"],
     "--num-gpus N"),
    ("audit", ["--data", "{t}/voc", "--out", "{t}/out"], "without torchrun"),
    ("report", ["{t}/runs", "--out", "{t}/out"], "without torchrun"),
    ("demo", ["--out", "{t}/out"], "without torchrun"),
])
def test_unsharded_commands_refuse_torchrun(command, argv, advice, tmp_path, monkeypatch,
                                            capsys):
    """`torchrun --nproc_per_node 2 -m smix transfer …` ran the whole job in both processes,
    each writing the same run folder (every log.jsonl line twice)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(command, [a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"smix {command}: error: does not run under "
                                               "torchrun (2 processes")
    assert advice in err[0]
    assert not (tmp_path / "out").exists()


def test_sharded_commands_and_one_process_are_let_through(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run("cam", ["--help-me"]) == 2  # reaches cam's own parser
    assert "torchrun" not in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run("report", ["--no-such-flag"]) == 2
    assert "torchrun" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "2x", "1.0"])
def test_a_world_size_not_torchruns_is_one_line_or_ignored(value, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE=abc (another tool's variable, not torchrun's count) ended `smix report`, which
    never reads it, in a ValueError traceback; a command that joins the process group says so in
    one line instead of a traceback from int()."""
    monkeypatch.setenv("WORLD_SIZE", value)
    assert run("report", [str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"smix report: error: {tmp_path / 'missing'}: no such run folder"]
    assert run("pretrain", ["--resume", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"smix pretrain: error: WORLD_SIZE={value!r} is not a number of processes "
                   "(torchrun sets it); unset it or start the command with torchrun"]
