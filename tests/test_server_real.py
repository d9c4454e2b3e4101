"""`mlxgen serve` with a real model: SmolLM2-135M (PyPI-shipped) answers through both clients."""

from __future__ import annotations

import pytest

from test_server import start_server, stop_server

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url():
    proc, url = start_server(["--models", "smollm2:135m"])
    yield url
    stop_server(proc)


def test_smollm2_says_paris_through_both_apis(url):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = oai.chat.completions.create(model="smollm2:135m", messages=question, max_tokens=24,
                                    temperature=0)
    assert "Paris" in r.choices[0].message.content
    reply = ollama.Client(host=url).chat("smollm2:135m", question,
                                         options={"temperature": 0, "num_predict": 24})
    assert "Paris" in reply.message.content
