"""From a validated request to the engine's ``Spec``: the checks that need the model and tokenizer
(model name, token caps, context length, chat markers), prompt rendering and tokenising, and grammar
compilation -- the expensive part, done last, only for a request that is otherwise acceptable."""

from __future__ import annotations

import hashlib
import json
import time

from .. import chat
from ..generation import SamplingParams
from .engine import Engine, Metrics, Spec
from .errors import ApiError, bad, library_message
from .grammar import SchemaBudget, check_json_schema
from .limits import Limits
from .schema import ChatRequest, CompletionRequest, _logit_bias, _text, check_at_most, parse

TOOL_CHOICE = "expected 'none', 'auto', 'required' or {type: 'function', function: {name}}"


class Server:
    """State shared by the routes: model, tokenizer, engine, limits, metrics."""

    def __init__(self, model_name: str, limits: Limits, api_key: str | None):
        self.model_name, self.limits, self.api_key = model_name, limits, api_key
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: Exception | None = None
        self.model = self.tokenizer = None
        self.created = int(time.time())
        self.fingerprint = "fp_aetheris"

    # --- loading -----------------------------------------------------------------------------------
    def load(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        config = json.dumps(model.cfg.to_dict(), sort_keys=True).encode()
        self.fingerprint = "fp_" + hashlib.sha256(config).hexdigest()[:10]
        engine = Engine(model, tokenizer, self.limits, self.metrics)
        engine.start()
        self.engine = engine

    def ready(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "The model is still loading; retry shortly.", code="model_loading")
        return self.engine

    # --- shared fields -----------------------------------------------------------------------------
    def _sampling(self, req, max_tokens: int | None, key: str = "max_tokens") -> SamplingParams:
        max_tokens = check_at_most(key, max_tokens, self.limits.max_tokens) if max_tokens is not None \
            else self.limits.max_tokens
        temperature, top_p = req.temperature, req.top_p
        if top_p == 0:  # the smallest nucleus is the top token: greedy
            temperature, top_p = 0.0, 1.0
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                              top_k=req.top_k, seed=req.seed, stop=req.stop or [])

    def _tokens(self, prompt_ids: list[int], param: str) -> list[int]:
        cap = min(self.limits.max_prompt_tokens, self.model.cfg.max_seq_len)
        if not prompt_ids:
            raise bad(param, "the prompt encodes to zero tokens")
        if len(prompt_ids) > cap:
            raise ApiError(400, f"The prompt has {len(prompt_ids)} tokens; this server accepts at most {cap}. "
                           "Shorten the messages.", param=param, code="context_length_exceeded")
        return prompt_ids

    def _prompt_bytes(self, size: int, param: str) -> None:
        """Checked before tokenising, which costs seconds of CPU for megabytes of text."""
        cap = self.limits.max_prompt_bytes
        if size > cap:
            raise ApiError(400, f"The prompt is {size} bytes; this server accepts at most {cap} bytes (and "
                           f"{min(self.limits.max_prompt_tokens, self.model.cfg.max_seq_len)} tokens). "
                           "Shorten the messages.", param=param, code="context_length_exceeded")

    def _encode_chat(self, messages: list[dict], tools: list[dict]) -> list[int]:
        """The prompt's token ids. Only the template's own markers become control tokens: request text
        (contents, tool calls and results, tool definitions) is tokenised with special-token matching
        off, so ``<|END_OF_TURN_TOKEN|>`` typed by a user stays those characters."""
        tok = self.tokenizer
        if chat.uses_this_template(tok):
            parts = chat.render_parts(messages, tools=tools or None)
            self._prompt_bytes(sum(len(text.encode("utf-8")) for text, _ in parts), "messages")
            markers = [text for text, marker in parts if marker]
            texts = [text for text, marker in parts if not marker]
            marker_ids = iter(tok(markers, add_special_tokens=False)["input_ids"]) if markers else iter(())
            text_ids = iter(tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if texts \
                else iter(())
            ids = [i for _, marker in parts for i in next(marker_ids if marker else text_ids)]
            return self._tokens(ids, "messages")
        # A checkpoint's own template renders one string, where request text cannot be told apart from
        # markers: refuse request text that spells a special token instead.
        request_text = json.dumps([messages, tools], ensure_ascii=False)
        for marker in self.special_texts:
            if marker in request_text:
                raise bad("messages", f"the text contains the control token {marker}, which this model's chat "
                          "template cannot keep apart from its own markers; remove it")
        try:
            prompt = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template that cannot render these messages
            raise bad("messages", f"the model's chat template cannot render them: {library_message(err)}") from None
        prompt = prompt.removesuffix(chat.START_RESPONSE)
        self._prompt_bytes(len(prompt.encode("utf-8")), "messages")
        return self._tokens(tok(prompt, add_special_tokens=False)["input_ids"], "messages")

    @property
    def special_texts(self) -> list[str]:
        tok = self.tokenizer
        return sorted({str(t) for t in tok.all_special_tokens} | {str(t) for t in tok.added_tokens_decoder.values()
                                                                   if getattr(t, "special", False)})

    # --- /v1/chat/completions ----------------------------------------------------------------------
    def chat_spec(self, body: dict) -> tuple[Spec, ChatRequest]:
        # Order: cheap checks first, then rendering + the prompt's size, and grammar compilation (the
        # expensive part) only for a request that is otherwise acceptable.
        req, budget = parse(ChatRequest, body, self.limits, self.model_name)
        tools = req.tools or []
        if req.max_completion_tokens is not None:
            params = self._sampling(req, req.max_completion_tokens, "max_completion_tokens")
        else:
            params = self._sampling(req, req.max_tokens)
        n = check_at_most("n", req.n, self.limits.max_n)
        logit_bias = _logit_bias(req.logit_bias, self.model.cfg.vocab_size, self.limits.max_logit_bias)
        ids = self.engine.ids
        grammars = self.engine.grammars
        # Tool choice -> which openers the assistant turn may start with.
        choice = req.tool_choice
        if choice is not None and not tools and choice != "none":
            raise bad("tool_choice", "only allowed when 'tools' are given")
        choice = choice if choice is not None else ("auto" if tools else "none")
        parallel = req.parallel_tool_calls
        call_tools = tools
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise bad("tool_choice", TOOL_CHOICE)
            call_tools = [t for t in tools if t["function"]["name"] == name]
            if not call_tools:
                raise bad("tool_choice", f"function {name[:64]!r} is not among the tools")
            openers, parallel = [ids.start_action], False
        elif choice == "none":
            openers = [ids.start_response]
        elif choice == "auto":
            openers = [ids.start_response, ids.start_action]
        elif choice == "required":
            openers = [ids.start_action]
        else:
            raise bad("tool_choice", TOOL_CHOICE)
        if None in openers:
            raise ApiError(400, "this model's tokenizer lacks the chat markers (<|START_RESPONSE|>, <|START_ACTION|>)",
                           param="messages", code="unsupported_model")
        schema = self._response_format(req.response_format, budget)
        prompt_ids = self._encode_chat(req.messages, tools)
        tool_grammar = grammars.tools(call_tools, parallel) if ids.start_action in openers else None
        json_grammar = None if schema is False else grammars.json(schema, "response_format.json_schema.schema")
        spec = Spec(prompts=[prompt_ids], n=n, params=params, chat=True, first_tokens=openers,
                    tool_grammar=tool_grammar, json_grammar=json_grammar,
                    logprobs=(req.top_logprobs or 0) if req.logprobs else None, logit_bias=logit_bias,
                    tool_schemas={t["function"]["name"]: t["function"]["parameters"] for t in call_tools})
        return spec, req

    def _response_format(self, fmt, budget: SchemaBudget):
        """False for free text; None for any JSON object; else the JSON schema (checked, not yet compiled)."""
        if fmt is None:
            return False
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("response_format", "expected {type: 'text' | 'json_object' | 'json_schema'}")
        if fmt["type"] == "text":
            return False
        if fmt["type"] == "json_object":
            return None
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad("response_format.json_schema", "expected {name, schema, strict}", "invalid_type")
        return check_json_schema(spec.get("schema", {}), "response_format.json_schema.schema", budget)

    # --- /v1/completions ---------------------------------------------------------------------------
    def completion_spec(self, body: dict) -> tuple[Spec, CompletionRequest, list[str]]:
        """The spec, the request, and each prompt as text (for echo)."""
        req, _ = parse(CompletionRequest, body, self.limits, self.model_name)
        prompts = req.prompt
        vocab = self.model.cfg.vocab_size
        if len(prompts) > self.limits.max_batch:
            raise bad("prompt", f"{len(prompts)} prompts; at most {self.limits.max_batch} per request")
        ids, texts = [], []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                _text(p, param, allow_empty=False)
                self._prompt_bytes(len(p.encode("utf-8")), param)
                ids.append(self._tokens(self.tokenizer(p)["input_ids"], param))
                texts.append(p)
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise bad(param, f"token ids must be in [0, {vocab})")
                ids.append(self._tokens(list(p), param))
                texts.append(self.tokenizer.decode(p, skip_special_tokens=False))
        # OpenAI's default for completions is 16 tokens (chat's is as many as the server allows).
        params = self._sampling(req, req.max_tokens if req.max_tokens is not None else min(16, self.limits.max_tokens))
        n = check_at_most("n", req.n, self.limits.max_n)
        if len(prompts) * n > self.limits.max_batch:
            raise bad("n", f"{len(prompts)} prompts x n={n} exceeds {self.limits.max_batch} sequences per request")
        spec = Spec(prompts=ids, n=n, params=params, chat=False, logprobs=req.logprobs,
                    logit_bias=_logit_bias(req.logit_bias, vocab, self.limits.max_logit_bias))
        return spec, req, texts
