"""The HTTP API in process (kiln.serve.asgi_app), spoken to by the real openai client and by plain HTTP: every answer
equals the pipeline's own output for the same input; refusals are 4xx with OpenAI's error body."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import torch
import transformers
from conftest import roberta_tokenizer

import kiln
from kiln.serve import asgi_app

TEXTS = ["the movie was terrible", "paris is the capital city of france"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    tokenizer = roberta_tokenizer()
    tokenizer.chat_template = CHATML
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, initializer_range=0.3, bos_token_id=0,
                                      pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("art") / "llama"
    kiln.export(str(ckpt), out, task="text-generation", batch="1:4")
    return out


@pytest.fixture(scope="module")
def served(artifacts, decoder):
    names = {"minilm": artifacts("bert", "feature-extraction"), "sst": artifacts("bert", "text-classification"),
             "llama": decoder}
    app = asgi_app(names, max_batch_size=4, max_tokens=32, max_batch_items=8)
    yield app, names
    app.state.backend.close()


def client(app, **headers):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kiln", headers=headers)


def run(coro):
    return asyncio.run(coro)


def test_openai_client_embeddings_equal_the_pipeline(served):
    import openai

    app, names = served

    async def go():
        async with client(app) as http:
            api = openai.AsyncOpenAI(api_key="none", base_url="http://kiln/v1", http_client=http)
            models = await api.models.list()
            floats = await api.embeddings.create(model="minilm", input=TEXTS)
            b64 = await api.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="base64")
            return models, floats, b64

    models, floats, b64 = run(go())
    assert {m.id for m in models.data} == {"minilm", "sst", "llama"}
    want = np.array(kiln.pipeline("feature-extraction", names["minilm"])(TEXTS, pooling="mean", normalize=True))
    np.testing.assert_allclose([d.embedding for d in floats.data], want, atol=1e-5)
    assert floats.usage.prompt_tokens > len(TEXTS)
    raw = b64.data[0].embedding  # the openai client hands base64 back as the string it got
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    np.testing.assert_allclose(decoded, want[0], atol=1e-5)


def test_openai_client_completions_and_chat_equal_the_pipeline(served):
    import openai

    app, names = served
    pipe = kiln.pipeline("text-generation", names["llama"])
    chat = [{"role": "user", "content": "hello world"}]

    async def go():
        async with client(app) as http:
            api = openai.AsyncOpenAI(api_key="none", base_url="http://kiln/v1", http_client=http)
            text = await api.completions.create(model="llama", prompt="hello world", max_tokens=8, temperature=0)
            reply = await api.chat.completions.create(model="llama", messages=chat, max_tokens=8, temperature=0)
            pieces = []
            stream = await api.chat.completions.create(model="llama", messages=chat, max_tokens=8, temperature=0,
                                                       stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                pieces.append(chunk)
            return text, reply, pieces

    text, reply, pieces = run(go())
    want = pipe("hello world", max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert text.choices[0].text == want and text.choices[0].finish_reason in ("stop", "length")
    assert text.usage.completion_tokens <= 8 and text.usage.prompt_tokens == len(pipe.tokenizer(["hello world"]).input_ids[0])
    want_chat = pipe(chat, max_new_tokens=8)[0]["generated_text"][-1]["content"]
    assert reply.choices[0].message.content == want_chat and reply.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == want_chat
    assert pieces[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stop_sequences_cut_the_text(served):
    app, names = served
    full = kiln.pipeline("text-generation", names["llama"])("hello world", max_new_tokens=12,
                                                            return_full_text=False)[0]["generated_text"]
    stop = full[3:5]
    assert stop

    async def go():
        async with client(app) as http:
            body = {"model": "llama", "prompt": "hello world", "max_tokens": 12, "temperature": 0, "stop": [stop]}
            plain = (await http.post("/v1/completions", json=body)).json()
            streamed = await http.post("/v1/completions", json={**body, "stream": True})
            return plain, streamed.text

    plain, events = run(go())
    assert plain["choices"][0]["text"] == full[:full.find(stop)] and plain["choices"][0]["finish_reason"] == "stop"
    chunks = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]
    assert events.rstrip().endswith("data: [DONE]")


def test_pipelines_and_embed_endpoints(served):
    app, names = served

    async def go():
        async with client(app) as http:
            one = (await http.post("/v1/pipelines/sst", json={"inputs": TEXTS[0], "top_k": None})).json()
            many = (await http.post("/v1/pipelines/sst", json={"inputs": TEXTS})).json()
            tei = (await http.post("/embed", json={"model": "minilm", "inputs": TEXTS})).json()
            return one, many, tei

    one, many, tei = run(go())
    pipe = kiln.pipeline("text-classification", names["sst"])
    assert one["output"] == json.loads(json.dumps(pipe(TEXTS[0], top_k=None)))
    assert many["output"] == json.loads(json.dumps(pipe(TEXTS)))
    np.testing.assert_allclose(tei, kiln.pipeline("feature-extraction", names["minilm"])(TEXTS, pooling="mean",
                                                                                         normalize=True), atol=1e-5)


@pytest.mark.parametrize("method,path,body,status,says", [
    ("post", "/v1/embeddings", b"{not json", 400, "not valid JSON"),
    ("post", "/v1/embeddings", {"model": "nope", "input": "x"}, 404, "'nope' is not served"),
    ("post", "/v1/embeddings", {"model": "llama", "input": "x"}, 400, "text-generation model"),
    ("post", "/v1/embeddings", {"model": "minilm", "input": ["x"] * 9}, 400, "at most 8"),
    ("post", "/v1/embeddings", {"model": "minilm", "input": []}, 400, "'input' must be"),
    ("post", "/v1/completions", {"model": "llama", "prompt": "hi", "max_tokens": 99}, 400, "at most 32"),
    ("post", "/v1/completions", {"model": "minilm", "prompt": "hi"}, 400, "feature-extraction model"),
    ("post", "/v1/completions", {"model": "llama", "prompt": "hi", "temperature": 5}, 400, "'temperature'"),
    ("post", "/v1/chat/completions", {"model": "llama", "messages": [{"content": "x"}]}, 400, "needs a 'role'"),
    ("post", "/v1/pipelines/sst", {"inputs": "x", "bogus": 1}, 400, "Unknown text-classification option"),
])
def test_refusals_are_openai_errors(served, method, path, body, status, says):
    app, _ = served

    async def go():
        async with client(app) as http:
            if isinstance(body, bytes):
                return await http.post(path, content=body, headers={"content-type": "application/json"})
            return await http.post(path, json=body)

    response = run(go())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"]


def test_api_key_health_and_metrics(artifacts):
    app = asgi_app({"minilm": artifacts("bert", "feature-extraction")}, api_key="s3cret")

    async def go():
        async with client(app) as anonymous, client(app, authorization="Bearer s3cret") as allowed:
            refused = await anonymous.post("/v1/embeddings", json={"model": "minilm", "input": "x"})
            health = await anonymous.get("/health")
            ok = await allowed.post("/v1/embeddings", json={"model": "minilm", "input": "x"})
            metrics = await anonymous.get("/metrics")
            return refused, health, ok, metrics

    try:
        refused, health, ok, metrics = run(go())
    finally:
        app.state.backend.close()
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    assert health.status_code == 200 and ok.status_code == 200
    assert 'kiln_requests_total{endpoint="/v1/embeddings",model="minilm",status="200"} 1.0' in metrics.text
    assert 'status="401"' in metrics.text


def test_overload_is_refused_at_once(artifacts):
    """Beyond max_ongoing_requests, 503 at once; every request is answered: sent = 2xx + 503."""
    app = asgi_app({"minilm": artifacts("bert", "feature-extraction")}, max_ongoing_requests=2, max_batch_size=1)

    async def go():
        async with client(app) as http:
            calls = [http.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS * 4}) for _ in range(12)]
            return await asyncio.gather(*calls)

    try:
        responses = run(go())
    finally:
        app.state.backend.close()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and len(codes) == 12
    refused = [r for r in responses if r.status_code == 503]
    assert all("--max-ongoing-requests" in r.json()["error"]["message"] for r in refused)


def test_concurrent_streams_share_decode_steps(served):
    """Eight streams at once: each equals the pipeline's own text, and the requests shared decode steps."""
    app, names = served
    pipe = kiln.pipeline("text-generation", names["llama"])
    prompts = [f"hello world {i}" if i % 2 else f"the river runs {i}" for i in range(8)]
    worker = app.state.backend.workers["llama"]
    steps_before, rows_before = worker.continuous.steps, worker.continuous.rows_stepped

    async def one(http, prompt):
        body = {"model": "llama", "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}
        events = (await http.post("/v1/completions", json=body)).text
        return "".join(json.loads(line[6:])["choices"][0]["text"] for line in events.splitlines()
                       if line.startswith("data: {"))

    async def go():
        async with client(app) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    texts = run(go())
    for prompt, text in zip(prompts, texts):
        assert text == pipe(prompt, max_new_tokens=10, return_full_text=False)[0]["generated_text"]
    # at least one decode step carried several requests (how many depends on when they arrived)
    assert worker.continuous.rows_stepped - rows_before > worker.continuous.steps - steps_before


def test_rerank_predict_and_images(artifacts, vit_artifacts, tmp_path):
    """text-embeddings-inference's /rerank over a one-output cross-encoder and /predict over a classifier; an image
    as base64 through /v1/pipelines equals the pipeline on the same image; a path is not read."""
    import io

    from conftest import make_checkpoint
    from PIL import Image

    ckpt, _ = make_checkpoint(tmp_path / "ce", "bert", "text-classification", id2label={0: "LABEL_0"},
                              label2id={"LABEL_0": 0})
    reranker = tmp_path / "reranker"
    kiln.export(str(ckpt), reranker, task="text-classification", batch="1:8", seq="1:64")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    app = asgi_app({"ce": reranker, "sst": artifacts("bert", "text-classification"),
                    "vit": vit_artifacts("image-classification")})

    async def go():
        async with client(app) as http:
            ranked = (await http.post("/rerank", json={"model": "ce", "query": "paris", "texts": TEXTS,
                                                       "return_text": True})).json()
            predicted = (await http.post("/predict", json={"model": "sst", "inputs": [TEXTS[0], [TEXTS[0], "a"]]})).json()
            not_reranker = await http.post("/rerank", json={"model": "sst", "query": "x", "texts": ["y"]})
            vision = (await http.post("/v1/pipelines/vit", json={
                "inputs": {"base64": base64.b64encode(png.getvalue()).decode()}, "top_k": 2})).json()
            path = await http.post("/v1/pipelines/vit", json={"inputs": "/etc/passwd"})
            return ranked, predicted, not_reranker, vision, path

    try:
        ranked, predicted, not_reranker, vision, path = run(go())
    finally:
        app.state.backend.close()
    logits = [r[0]["score"] for r in kiln.pipeline("text-classification", reranker)(
        [{"text": "paris", "text_pair": t} for t in TEXTS], top_k=None, function_to_apply="none")]
    want = sorted(((i, 1 / (1 + np.exp(-x))) for i, x in enumerate(logits)), key=lambda p: -p[1])
    assert [r["index"] for r in ranked] == [i for i, _ in want]
    np.testing.assert_allclose([r["score"] for r in ranked], [s for _, s in want], atol=1e-5)
    assert ranked[0]["text"] == TEXTS[want[0][0]]
    sst = kiln.pipeline("text-classification", artifacts("bert", "text-classification"))
    assert predicted == json.loads(json.dumps([sst(TEXTS[0], top_k=None),
                                               sst({"text": TEXTS[0], "text_pair": "a"}, top_k=None)]))
    assert not_reranker.status_code == 400 and "not a reranker" in not_reranker.json()["error"]["message"]
    assert vision["output"] == json.loads(json.dumps(kiln.pipeline("image-classification",
                                                                   vit_artifacts("image-classification"))(image, top_k=2)))
    assert path.status_code == 400 and "not read over HTTP" in path.json()["error"]["message"]
