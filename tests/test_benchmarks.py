"""Benchmarks run end to end on the tiny world (smoke: they print their tables; no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_env


def test_bench_env_prints_its_table(tiny_world_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--world", str(tiny_world_dir), "--steps", "1", "--no-carracing", "--no-hd",
            "--num-envs", "2", "--guidance", "2.0", "--groups", "1", "--threads", "1"]
    assert bench_env.main(argv) == 0
    out = capsys.readouterr().out
    assert "sampler=default {'guidance': 2.0, 'groups': 1}" in out
    assert "| MatrixWorldVectorEnv | torch | 2 | 84x84 |" in out


def test_bench_env_table_has_a_gpu_column_only_on_cuda() -> None:
    row = {"env": "MatrixWorldEnv", "backend": "torch", "num_envs": 1, "obs": "84x84", "steps_s": 50.0,
           "ms_step": 20.0, "vs_carracing": 1.0, "rss": 900.0, "gpu": None}
    cpu = bench_env.format_table([row])
    assert "GPU" not in cpu and cpu.splitlines()[-1].endswith("| 900 |")
    cuda = bench_env.format_table([{**row, "gpu": 123.4}])
    assert "| peak GPU MiB |" in cuda.splitlines()[0] and cuda.splitlines()[-1].endswith("| 900 | 123 |")
    assert cpu.splitlines()[-1].endswith("| 1.00 | 900 |")
    unmeasured = bench_env.format_table([{**row, "vs_carracing": None}])  # --no-carracing: no ratio, no "nan"
    assert unmeasured.splitlines()[-1].endswith("| 20.0 | - | 900 |")


def test_bench_env_rejects_bad_steps(tiny_world_dir: Path) -> None:
    from world_model.errors import UsageError

    with pytest.raises(UsageError, match="--steps must be >= 1, got 0"):
        bench_env.main(["--world", str(tiny_world_dir), "--steps", "0"])
    with pytest.raises(UsageError, match="each must be one of .*, got 'tvm'"):
        bench_env.main(["--world", str(tiny_world_dir), "--backends", "torch", "tvm", "--no-carracing"])
    with pytest.raises(UsageError, match="--compile-mode must be one of .*got 'fast'"):
        bench_env.main(["--world", str(tiny_world_dir), "--compile-model", "--compile-mode", "fast"])
    with pytest.raises(UsageError, match="--compile-mode reduce-overhead needs --compile-model"):
        bench_env.main(["--world", str(tiny_world_dir), "--compile-mode", "reduce-overhead"])
    with pytest.raises(UsageError, match="runs float32 graphs without torch.compile; got --dtype bfloat16"):
        bench_env.main(["--world", str(tiny_world_dir), "--backends", "onnxruntime", "--dtype", "bfloat16"])


def test_bench_env_backends_side_by_side(
    tiny_world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("MATRIX_WORLD_CACHE", str(tmp_path))
    argv = ["--world", str(tiny_world_dir), "--steps", "1", "--no-carracing", "--no-hd", "--num-envs", "2",
            "--backends", "torch", "onnxruntime", "--threads", "1"]
    assert bench_env.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| MatrixWorldVectorEnv |")]
    assert [r.split(" | ")[1] for r in rows] == ["torch", "onnxruntime"]  # adjacent rows, same config


def test_bench_env_parts_split_a_vector_step(tiny_world_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """--parts: the DiT, the decode and the rest of a batched step add up to the row's ms per step."""
    argv = ["--world", str(tiny_world_dir), "--steps", "2", "--no-carracing", "--no-hd", "--num-envs", "2",
            "--threads", "1", "--parts"]
    assert bench_env.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("| DiT ms | decode ms | rest ms |") for line in lines)
    cells = next(line for line in lines if line.startswith("| MatrixWorldVectorEnv |")).strip("| ").split(" | ")
    ms_step, dit, decode, rest = float(cells[5]), float(cells[8]), float(cells[9]), float(cells[10])
    assert dit > 0 and decode > 0 and rest >= 0
    assert abs(dit + decode + rest - ms_step) <= 0.2, cells  # rounding of the printed values only
    single = next(line for line in lines if line.startswith("| MatrixWorldEnv |"))
    assert single.endswith("| | | |")  # no split for the single env's rows


def test_bench_env_obs_decoders_side_by_side(tiny_obs_world_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """--obs-decoders True False: adjacent 84x84 rows with the world's observation decoder and with the VAE."""
    argv = ["--world", str(tiny_obs_world_dir), "--steps", "1", "--no-carracing",
            "--threads", "1", "--obs-decoders", "True", "False", "--quick"]
    assert bench_env.main(argv) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| MatrixWorld")]
    small = [(r[0], r[2], r[3]) for r in rows if r[3].startswith("84x84")]
    assert small[:2] == [("| MatrixWorldEnv", "1", "84x84 (obs decoder)"), ("| MatrixWorldEnv", "1", "84x84")]
    assert ("| MatrixWorldVectorEnv", "4", "84x84") in small  # --quick: 1 and 4 envs
    assert sum(r[3] == "720x1280" for r in rows) == 2  # 720p rows once each (single, vector): always the VAE's

    # --obs-decoders False alone still measures the 720p rows, and no row claims the observation decoder
    capsys.readouterr()
    assert bench_env.main([*argv[:-4], "--obs-decoders", "False", "--quick"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| MatrixWorld")]
    assert sum(r[3] == "720x1280" for r in rows) == 2 and not any("obs decoder" in r[3] for r in rows)
