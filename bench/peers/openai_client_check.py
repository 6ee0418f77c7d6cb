"""Talk to a gantry registry with the official OpenAI Python client (`openai`), as an
evaluation harness or a chat front-end would, and print what it got as one JSON object.

    python openai_client_check.py --base-url http://HOST:PORT/v1 --api-key TOKEN \
        --model NAME@ALIAS --prompt TEXT --score-tokens 1,2,3 [--max-tokens 12]

Used by launch/tests/openai_api.rs, which checks the numbers against gantry's own trainer.
Every call goes through the client's typed models, so a response shape the client cannot
parse fails here.
"""

import argparse
import json
import sys

import openai


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--score-tokens", required=True, help="comma-separated token ids to score with echo")
    p.add_argument("--max-tokens", type=int, default=12)
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    out = {"openai_version": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]

    c = client.completions.create(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=0, logprobs=2)
    ch = c.choices[0]
    out["completion"] = {
        "text": ch.text,
        "finish_reason": ch.finish_reason,
        "tokens": ch.logprobs.tokens,
        "token_logprobs": ch.logprobs.token_logprobs,
        "top_logprobs": ch.logprobs.top_logprobs,
        "usage": c.usage.model_dump(),
        "model": c.model,
        "system_fingerprint": c.system_fingerprint,
    }

    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(
        model=a.model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    out["streamed"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage}

    ids = [int(t) for t in a.score_tokens.split(",")]
    e = client.completions.create(model=a.model, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    out["echo"] = {
        "text": e.choices[0].text,
        "token_logprobs": e.choices[0].logprobs.token_logprobs,
        "usage": e.usage.model_dump(),
    }

    many = client.completions.create(
        model=a.model, prompt=[a.prompt, a.prompt + " and"], max_tokens=4, n=2, temperature=0.8, seed=7
    )
    out["many"] = [{"index": c.index, "text": c.text} for c in many.choices]

    chat = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": a.prompt}],
        max_tokens=a.max_tokens, temperature=0.8, seed=3, logprobs=True, top_logprobs=2,
    )
    out["chat"] = {
        "content": chat.choices[0].message.content,
        "role": chat.choices[0].message.role,
        "finish_reason": chat.choices[0].finish_reason,
        "logprobs": [t.logprob for t in chat.choices[0].logprobs.content],
        "usage": chat.usage.model_dump(),
    }
    deltas = []
    for chunk in client.chat.completions.create(
        model=a.model,
        messages=[{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": a.prompt}],
        max_tokens=a.max_tokens, temperature=0.8, seed=3, stream=True,
    ):
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
    out["chat_streamed"] = "".join(deltas)

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        out["bad_model"] = None
    except openai.NotFoundError as err:
        out["bad_model"] = {"status": err.status_code, "body": err.body}
    try:
        openai.OpenAI(base_url=a.base_url, api_key="wrong-token-0123456789", max_retries=0).models.list()
        out["bad_key"] = None
    except openai.AuthenticationError as err:
        out["bad_key"] = {"status": err.status_code}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
