"""OpenAI response pieces from the cluster's chunks: logprobs in the completions and chat
shapes, usage, and the KV transfer record shown with --expose-routing. Pure."""

from __future__ import annotations

from frontend.client import Chunk
from frontend.tokens import Tokenizer
from frontend import reasoning as reasoning_
from frontend.tools import Streamer, ToolPlan, message


def _lp(x: float) -> float:
    return max(x, -9999.0)      # -inf is not JSON; OpenAI and vLLM answer -9999


def _name(token_id: int, token: str, by_id: bool) -> str:
    """A token as the logprobs show it: its text, or with vLLM's return_tokens_as_token_ids
    its id as vLLM's placeholder names it."""
    return f"token_id:{token_id}" if by_id else token


def cmpl_logprobs(chunks: list[Chunk], offset0: int,
                  prompt: tuple[str, list] | None = None, by_id: bool = False) -> dict | None:
    """Completions logprobs; `prompt` (echo: the first prompt token's name, the logprobs
    of the others) puts the prompt's ahead, the first token's logprob None, as vLLM.
    `by_id`: every token named by its id (`_name`). Each position lists its own token and
    then the top k (with `logprobs: 0`, its own alone), or the tokens a request named
    (logprob_token_ids), in vLLM's order."""
    toks: list = []
    lps: list = []
    tops: list = []
    offs: list = []
    off = offset0
    rest = [lp for ch in chunks for lp in ch.logprobs]
    if prompt is not None:
        first, plps = prompt
        toks.append(first)
        lps.append(None)
        tops.append(None)
        offs.append(off)
        off += len(first)
        rest = list(plps) + rest
    for lp in rest:
        tok = _name(lp.token_id, lp.token, by_id)
        toks.append(tok)
        lps.append(_lp(lp.logprob))
        tops.append({tok: _lp(lp.logprob), **{_name(t.token_id, t.token, by_id):
                                              _lp(t.logprob) for t in lp.top}})
        offs.append(off)
        off += len(tok)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def prompt_logprobs(plps: list) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}} for it and the top k."""
    out: list = [None]
    for lp in plps:
        d = {str(lp.token_id): {"logprob": _lp(lp.logprob), "rank": lp.rank,
                                "decoded_token": lp.token}}
        for rank, t in enumerate(lp.top, 1):
            d.setdefault(str(t.token_id), {"logprob": _lp(t.logprob), "rank": rank,
                                           "decoded_token": t.token})
        out.append(d)
    return out


def chat_logprobs(chunks: list[Chunk], tok: Tokenizer, by_id: bool = False) -> dict:
    """`by_id`: every token named by its id (`_name`); a sampled token's `bytes` stay its
    text's, a top one's are its name's, as vLLM gives them."""
    content = []
    for ch in chunks:
        for lp in ch.logprobs:
            top = [_name(t.token_id, t.token, by_id) for t in lp.top]
            content.append({
                "token": _name(lp.token_id, lp.token, by_id), "logprob": lp.logprob,
                "bytes": tok.token_bytes(lp.token),
                "top_logprobs": [{"token": n, "logprob": t.logprob,
                                  "bytes": tok.token_bytes(n)} for n, t in zip(top, lp.top)]})
    return {"content": content}


def usage(n_prompt: int, n_gen: int, cached: int = 0, details: bool = False) -> dict:
    u = {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
         "total_tokens": n_prompt + n_gen}
    if details:   # as vLLM: off by default (it says what other tenants sent)
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def kv_info(ch: Chunk | None) -> dict | None:
    if ch is None or ch.kv_transfer is None:
        return None
    k = ch.kv_transfer
    if k.mode == "push":
        return {"mode": "push", "bytes": k.bytes, "status": k.status, "tokens": k.tokens,
                "seconds": round(k.read_seconds, 6),    # first WRITE -> last landed
                "exposed_seconds": round(k.exposed_seconds, 6),
                "hidden_share": round(1 - k.exposed_seconds / k.read_seconds, 3)
                if k.read_seconds > 0 else None,
                "post_seconds": round(k.post_seconds, 6),
                "prep_seconds": round(k.prep_seconds, 6),
                "writes": k.writes, "descriptors": k.descriptors,
                "wait_seconds": round(k.seconds, 6),
                **({"reason": k.reason} if k.reason else {}),
                **({"checksummed": True} if k.checksummed else {})}
    return {"bytes": k.bytes, "seconds": round(k.seconds, 6),
            "read_seconds": round(k.read_seconds, 6),
            "prep_seconds": round(k.prep_seconds, 6),
            "read_cpu_seconds": round(k.read_cpu_seconds, 6),
            "gbps": round(k.bytes / k.seconds / 1e9, 3) if k.seconds > 0 else None,
            "read_gbps": round(k.bytes / k.read_seconds / 1e9, 3)
            if k.read_seconds > 0 else None,
            "descriptors": k.descriptors, "tokens": k.tokens, "status": k.status,
            **({"reason": k.reason} if k.reason else {}),
            **({"checksummed": True} if k.checksummed else {}),
            **({"relayout_seconds": round(k.relayout_seconds, 6)}
               if k.relayout_seconds else {})}


class Reply:
    """What the response of one request needs besides its chunks: the OpenAI shapes of
    its choices (message, delta or text), logprobs and usage."""

    def __init__(self, rid: str, created: int, endpoint: str, body, prompts: list[list[int]],
                 tok: Tokenizer, chat: bool, details: bool = False,
                 echo: list[str] | None = None, firsts: list[str] | None = None,
                 tools: ToolPlan | None = None, reasoning: reasoning_.Plan | None = None,
                 plp: bool = False) -> None:
        """`plp`: the engines compute the prompt's logprobs (asked for, or echo with
        logprobs): a whole answer carries them, as vLLM's does."""
        self.rid, self.created, self.endpoint, self.body = rid, created, endpoint, body
        self.prompts, self.tok, self.chat, self.details = prompts, tok, chat, details
        self.echo, self.firsts = echo, firsts      # echo: each prompt's text, its first token's
        self.plp = plp
        self.echo_only = bool(getattr(body, "echo_only", False))
        self.obj = "chat.completion" if chat else "text_completion"
        self.tools = tools                         # chat: the request's tool calls to make
        self.reasoning = reasoning                 # chat: the reasoning parser's plan
        self.reasoning_tokens = 0                  # over the choices finished so far
        self._thinks: dict[int, reasoning_.Stream] = {}
        self.role = body.reply_role() if chat else None
        self._streams: dict[int, Streamer] = {}

    def logprobs(self, chunks: list[Chunk], offset: int, prompt: int | None) -> dict | None:
        """`prompt`: with echo, the index of the prompt whose logprobs come first. vLLM's
        return_tokens_as_token_ids names every token `token_id:<id>`."""
        b = self.body
        by_id = bool(b.return_tokens_as_token_ids)
        if self.chat:
            return chat_logprobs(chunks, self.tok, by_id) if b.logprobs else None
        if b.logprobs is None:
            return None
        head = None
        if prompt is not None and self.firsts is not None and chunks:
            head = (_name(self.prompts[prompt][0], self.firsts[prompt], by_id),
                    chunks[0].prompt_logprobs)
        # echo with max_tokens 0: the prompt's alone (vLLM's one computed token unseen)
        return cmpl_logprobs([] if self.echo_only else chunks, offset, head, by_id)

    def choice(self, index: int, text: str, chunks: list[Chunk], finish, offset: int = 0,
               delta: bool = False, echo_of: int | None = None,
               prompt: int | None = None) -> dict:
        """`prompt`: completions, the index of the prompt whose token ids this choice
        carries (vLLM's return_token_ids: the whole answer's, or a stream's first chunk)."""
        lp = self.logprobs(chunks, offset, echo_of)
        # vLLM's: the stop string or stop token id that ended the choice (None otherwise)
        why = chunks[-1].stop_reason if chunks and finish else None
        ids = ({"token_ids": [t for c in chunks for t in c.token_ids]}
               if self.body.return_token_ids else {})
        if not self.chat:
            c = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish,
                 "stop_reason": why, **ids}
            if ids and prompt is not None:
                c["prompt_token_ids"] = self.prompts[prompt]
            if self.plp and not delta and chunks:
                c["prompt_logprobs"] = prompt_logprobs(chunks[0].prompt_logprobs)
            return c
        out_ids = [t for c in chunks for t in c.token_ids]
        if self.reasoning is not None and not self.reasoning.include:
            lp = None            # as vLLM: hidden reasoning leaks through no token metadata
        if delta:
            d: dict = {}
            if self.reasoning is not None:    # reasoning first; tools read the content left
                d = self._think(index, text, out_ids, finish)
                text = d.pop("content", "")
            if self.tools is not None:
                st = self._streams.get(index)
                if st is None:
                    st = self._streams[index] = Streamer(
                        self.tools, getattr(self.tok, "tok", None), self.body.model)
                d2, finish = st.feed(text, out_ids, finish)
                d = {**d, **d2}
            elif text:
                d["content"] = text
            return {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish,
                    "stop_reason": why, **ids}
        thought = None
        if self.reasoning is not None:
            thought, text, n = reasoning_.split(self.reasoning, text, out_ids, self.prompts[0],
                                                self.body.model)
            self.reasoning_tokens += n
        msg = {"role": self.role, "content": text}
        if self.tools is not None:
            msg, finish = message(self.tools, text or "", finish,
                                  getattr(self.tok, "tok", None), self.body.model)
            msg["role"] = self.role
        if self.reasoning is not None:
            msg["reasoning"] = thought   # vLLM's field: null when nothing was reasoning
        return {"index": index, "message": msg, "logprobs": lp, "finish_reason": finish,
                "stop_reason": why, **ids}

    def _think(self, index: int, text: str, ids: list[int], finish) -> dict:
        st = self._thinks.get(index)
        if st is None:
            st = self._thinks[index] = reasoning_.Stream(self.reasoning, self.prompts[0],
                                                          self.body.model)
        d = st.feed(text, ids, finish is not None)
        if finish is not None:
            self.reasoning_tokens += st.tokens()
        return d

    def usage(self, n_gen: int, cached: int) -> dict:
        u = usage(sum(len(p) for p in self.prompts), n_gen, cached, self.details)
        if self.reasoning is not None:     # as vLLM, whenever a reasoning parser runs
            u["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return u
