"""How the fake upstream refuses a request, word for word as the real servers do: OpenAI's
reasoning models (gpt-5*, o1*, o3*, o4-mini*) and the parameters they refuse, older servers that
do not know a parameter, LiteLLM's 400 for an unknown model and Azure OpenAI's content filter."""

from __future__ import annotations

from typing import Any, Literal

ErrorStyle = Literal["openai", "litellm", "azure_content_filter"]

REASONING_MODELS = ("gpt-5", "o1", "o3", "o4-mini")


def is_reasoning_model(model: str) -> bool:
    return model.startswith(REASONING_MODELS)


def refusal(model: str, body: dict[str, Any], refuse: tuple[str, ...] = (),
            api: Literal["chat", "responses"] = "chat") -> dict[str, Any] | None:
    """The 400 error object OpenAI answers a request with a parameter this model does not take,
    word for word, or None. `refuse`: parameters refused the way older compatible servers do.

    The bodies as users reported them: max_tokens (griptape-ai/ComfyUI-Griptape#312), temperature
    (this project's issue 9), reasoning_effort to gpt-4o (AAswordman/Operit#1048),
    reasoning.effort to a non-reasoning model on /v1/responses (BoundaryML/baml#2708)."""
    for name in refuse:
        if name in body:
            return _error(f"Unrecognized request argument supplied: {name}", None, None)
    if api == "responses":
        if is_reasoning_model(model) and "temperature" in body:
            return _error("Unsupported parameter: 'temperature' is not supported with this model.",
                          "temperature", "unsupported_parameter")
        if not is_reasoning_model(model) and "reasoning" in body:
            return _error("Unsupported parameter: 'reasoning.effort' is not supported with this "
                          "model.", "reasoning.effort", "unsupported_parameter")
        return None
    if not is_reasoning_model(model):
        if "reasoning_effort" in body:
            return _error("Unrecognized request argument supplied: reasoning_effort", None, None)
        return None
    if "max_tokens" in body:
        return _error("Unsupported parameter: 'max_tokens' is not supported with this model. "
                      "Use 'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
    temperature = body.get("temperature", 1)
    if temperature != 1:
        return _error(f"Unsupported value: 'temperature' does not support {temperature} with this "
                      "model. Only the default (1) value is supported.", "temperature",
                      "unsupported_value")
    return None


def _error(message: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


def error_body(style: ErrorStyle, status: int, code: str | None, message: str | None,
               model: str) -> dict[str, Any]:
    """The JSON body of a scripted status failure, in the style the script names."""
    if style == "litellm":
        # LiteLLM's proxy: the message is the repr of a dict, type and param the string "None"
        # (BerriAI/litellm#8821, #3142).
        inner = (f"/chat/completions: Invalid model name passed in model={model}. "
                 "Call `/v1/models` to view available models for your key.")
        return {"error": {"message": repr({"error": inner}), "type": "None", "param": "None",
                          "code": str(status)}}
    if style == "azure_content_filter":
        # Azure OpenAI's refusal of a prompt (openai/openai-python#331, compl-ai/compl-ai#20).
        return {"error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                       "content management policy. Please modify your prompt and retry. To learn "
                       "more about our content filtering policies please read our documentation: "
                       "https://go.microsoft.com/fwlink/?linkid=2198766",
            "type": None, "param": "prompt", "code": "content_filter", "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                "hate": {"filtered": False, "severity": "safe"},
                "jailbreak": {"filtered": False, "detected": False},
                "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": True, "severity": "medium"}}}}}
    code = code or {401: "invalid_api_key", 404: "model_not_found"}.get(status)
    return _error(message or f"Scripted failure with status {status}.", None, code)
