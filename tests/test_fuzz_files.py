"""A fast slice of the mutation fuzzing of every kind of .lowbit file (the long run: scripts/fuzz_files.py).

Every outcome is a LowbitError or a correct result; ``load``, ``load_state_dict``, ``inspect`` and the Engine
accept and reject the same files, and ``load`` and the Engine compute the same outputs (tests/fuzzing.py).
"""

from __future__ import annotations

import random
import warnings

import pytest

import fuzzing

#: cases per run of the suite; the long run in docs/benchmarks.md covers thousands
CASES = 96


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = fuzzing.model_files(tmp_path_factory.mktemp("fuzz"))
    return {kind: path.read_bytes() for kind, path in files.items()}


@pytest.mark.parametrize("kind", sorted(fuzzing.KINDS))
def test_unmutated_files_are_read_alike(originals, tmp_path, kind):
    path = tmp_path / "m.lowbit"
    path.write_bytes(originals[kind])
    outcome = fuzzing.check(path)
    if fuzzing.KINDS[kind][2]:
        assert set(outcome.values()) == {"ok"}
    else:
        assert outcome == {"load": "ConfigError[]", "load_state_dict": "ok", "engine": "FormatError[bad-graph]",
                           "inspect": "ok"}


@pytest.mark.parametrize("case", range(CASES))
def test_mutated_files_give_lowbit_errors_or_agreeing_results(originals, tmp_path, case):
    rng = random.Random(case)
    kind = rng.choice(sorted(originals))
    _, blob = fuzzing.mutate(originals[kind], rng)
    path = tmp_path / "m.lowbit"
    path.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuzzing.check(path)

