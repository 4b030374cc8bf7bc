"""`OpenAIJudge`: the judge behind any vLLM OpenAI-compatible server, over HTTP (`judge.kind: openai`).

Besides the OpenAI chat-completions API it sends vLLM's request fields (structured outputs,
assistant prefill, prompt log-probabilities); a server that refuses them gets a hint naming the fix.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from serve.judge import (
    _RETRYABLE,
    Completion,
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    _prefill_fields,
    _sum_logprobs,
    _sum_prompt_logprobs,
    redact_url,
    structured,
)

# what OpenAIJudge sends beyond the OpenAI API: vLLM's structured outputs, assistant prefill and
# prompt log-probabilities (channel classification)
VLLM_FIELDS = ("structured_outputs", "continue_final_message", "add_generation_prompt", "prompt_logprobs")


# how servers refuse a field they do not know (OpenAI, pydantic's extra="forbid", FastAPI, others);
# vLLM's own 400s about these fields' values ("prompt_logprobs must be ...") say none of this
_UNKNOWN_FIELD = re.compile(
    r"unrecognized|unknown (field|param|argument)|unexpected (keyword|field|param|argument)|"
    r"extra_forbidden|extra (inputs|fields) are not permitted|additional properties|not a valid param",
    re.I,
)


def _dialect_hint(r) -> str:
    """A refusal of the vLLM request fields (OpenAI's API, servers that forbid unknown fields): say
    what the judge needs instead of leaving a bare 400."""
    text = r.text.lower()
    if r.status_code in (400, 422) and any(f in text for f in VLLM_FIELDS) and _UNKNOWN_FIELD.search(text):
        return (
            " (judge.kind: openai sends vLLM's extra request fields: structured outputs, assistant prefill "
            "and, for channel classification, prompt log-probabilities; point judge.endpoint at a vLLM "
            "OpenAI-compatible server, e.g. `vllm serve MODEL`)"
        )
    return ""


class OpenAIJudge(JudgeClient):
    """A vLLM OpenAI-compatible chat-completions server: besides the OpenAI API it is sent vLLM's
    `structured_outputs`, `continue_final_message` (the prompts' assistant prefill) and
    `prompt_logprobs` (channel classification); a server without them refuses or ignores them."""

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0):
        import httpx

        self.base = endpoint.rstrip("/")
        self.shown = redact_url(self.base)  # what errors and /healthz say: no user:password@ or query
        self.model = model
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0))

    @classmethod
    def from_settings(cls, s) -> OpenAIJudge:
        return cls(s.endpoint, s.model_id, api_key=os.environ.get(s.api_key_env), timeout_s=s.timeout_s)

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/completions; transport failures and _RETRYABLE codes (429, 500, 502-504) ->
        JudgeUnavailable, others -> JudgeError."""
        import httpx

        try:
            r = await asyncio.wait_for(
                self._client.post(f"{self.base}/chat/completions", json=body), self.timeout_s
            )
        except (TimeoutError, httpx.TransportError) as e:
            raise JudgeUnavailable(f"judge at {self.shown} unreachable: {type(e).__name__}") from None
        if r.status_code in _RETRYABLE:
            raise JudgeUnavailable(f"judge at {self.shown} answered {r.status_code}")
        if r.status_code != 200:
            raise JudgeError(
                f"judge at {self.shown} answered {r.status_code}: {r.text[:300]}{_dialect_hint(r)}"
            )
        try:
            data = r.json()
        except ValueError:
            raise JudgeError(
                f"judge at {self.shown} answered 200 with a non-JSON body: {r.text[:200]!r}"
            ) from None
        if not isinstance(data, dict) or data.get("object") == "error" or "error" in data:
            err = data.get("error") if isinstance(data, dict) else None
            msg = (err.get("message") if isinstance(err, dict) else err) or (
                data.get("message") if isinstance(data, dict) else None
            )
            raise JudgeError(f"judge at {self.shown} answered an error: {msg or str(data)[:300]}")
        return data

    async def complete(
        self,
        messages,
        *,
        max_tokens,
        temperature=0.0,
        choice=None,
        json_schema=None,
        logprobs=False,
        prefill=None,
        stop=None,
    ):

        body: dict[str, Any] = {
            "model": self.model,
            **_prefill_fields(messages, prefill),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        so = structured(choice, json_schema)
        if so is not None:
            body["structured_outputs"] = so
        if logprobs:
            body["logprobs"] = True
        if stop:
            body["stop"] = stop
        data = await self._post(body)
        try:
            c = data["choices"][0]
            text = c["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"judge at {self.shown} answered without choices: {str(data)[:300]}") from None
        try:
            if not isinstance(text, str):  # content parts, say: not what a completion of text is
                raise TypeError
            lp = _sum_logprobs((c.get("logprobs") or {}).get("content")) if logprobs else None
        except (TypeError, AttributeError):
            raise JudgeError(
                f"judge at {self.shown} answered an unreadable completion: {str(c)[:300]}"
            ) from None
        return Completion(text=text, logprob=lp)

    async def prompt_logprob(self, messages, prefill=None):
        body = {
            "model": self.model,
            **_prefill_fields(messages, prefill),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        }
        data = await self._post(body)
        if not isinstance(data, dict):
            raise JudgeError(f"judge at {self.shown} answered an unreadable completion: {str(data)[:300]}")
        return _sum_prompt_logprobs(data.get("prompt_logprobs"), data.get("prompt_token_ids"))

    async def health(self) -> None:
        import httpx

        try:
            r = await self._client.get(f"{self.base}/models", timeout=min(10.0, self.timeout_s))
        except httpx.HTTPError as e:
            raise JudgeUnavailable(f"judge at {self.shown} unreachable: {type(e).__name__}") from None
        if r.status_code != 200:
            raise JudgeUnavailable(f"judge at {self.shown} answered {r.status_code}")
        # vLLM answers a request for a model it does not list with 404 (every label request fails);
        # other OpenAI-compatible servers (llama.cpp, TGI, Ollama, LiteLLM) answer to names they list
        # differently: a note for /healthz, not an outage
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return f"judge at {self.shown}: GET /models lists no models"
        if self.model not in served:
            return (
                f"judge at {self.shown} lists {served[:10]}, not {self.model!r} (judge.model_id): if it "
                "does not answer to that name, every label request fails; set judge.model_id to a listed id"
            )
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
