"""Prompt templates: how a record becomes the text the model reads (the prompt) and learns to write (the response).

A training example is ``prompt + response + EOS``. Only the response and its EOS are trained on by default:
the prompt's labels are -100 (see :mod:`minipeft.data.tokenization`). Generation builds the prompt with the
same :func:`format_prompt`, so a fine-tuned model sees at inference exactly what it saw in training; the
adapter's saved config records the template name.

The Alpaca template (Taori et al., 2023), with an input::

    Below is an instruction that describes a task, paired with an input that provides further context. Write a
    response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<EOS>

``plain`` is the instruction (and input) on their own lines, then the response. ``chat`` renders one user
turn with the tokenizer's own chat template (``tokenizer.apply_chat_template``), so instruct models such as
SmolLM2-Instruct are fine-tuned in the format they already know; the response is the assistant turn as that
template writes it (for SmolLM2: ``"...<|im_end|>"``, and ``<|im_end|>`` is its EOS).

``auto``, the default of every command, is not a template but a choice made once the tokenizer is known
(:func:`resolve_template_name`): ``chat`` when the tokenizer has a chat template, else ``alpaca``. The
resolved name is what the data report prints and what the adapter records, so generation uses it too.
"""

from dataclasses import dataclass

from minipeft.core.errors import UserError


@dataclass(frozen=True)
class Template:
    """Text around a record: ``prompt_with_input`` / ``prompt_without_input`` are ``str.format`` patterns."""

    name: str
    description: str
    prompt_with_input: str = ""
    prompt_without_input: str = ""


ALPACA = Template(
    name="alpaca",
    description="the Stanford Alpaca prompt (### Instruction / ### Input / ### Response)",
    prompt_with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

PLAIN = Template(
    name="plain",
    description="the instruction and input on their own lines, then the response",
    prompt_with_input="{instruction}\n{input}\n",
    prompt_without_input="{instruction}\n",
)

CHAT = Template(name="chat", description="one user turn in the tokenizer's own chat template")

TEMPLATES = {template.name: template for template in (ALPACA, PLAIN, CHAT)}
TEMPLATE_CHOICES = ["auto", *TEMPLATES]  # what --template accepts


def resolve_template_name(name: str, tokenizer) -> str:
    """``"auto"`` -> ``"chat"`` when the tokenizer has a chat template (instruct models), else ``"alpaca"``;
    any other name is returned as it is."""
    if name != "auto":
        return name
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def format_prompt(instruction: str, input: str, template: str, tokenizer=None) -> str:
    """The prompt text for a record, exactly as used in training; generation calls this too.

    Args:
        instruction: the task.
        input: optional context (``""`` for none).
        template: a name in :data:`TEMPLATES`.
        tokenizer: needed only for ``"chat"``.
    """
    if template == "chat":
        messages = [_user_message(instruction, input)]
        return _render_chat(tokenizer, messages, add_generation_prompt=True)
    pattern = _template(template)
    return (pattern.prompt_with_input if input else pattern.prompt_without_input).format(
        instruction=instruction, input=input)


def prompt_and_response(record, template: str, tokenizer=None) -> tuple[str, str]:
    """``(prompt, response)`` for a :class:`~minipeft.data.loading.Record`; the caller appends EOS.

    For ``"chat"`` the response is the assistant turn as the chat template renders it (its end-of-turn marker
    included, trailing whitespace dropped), found as the text that the full conversation adds to the prompt.
    """
    prompt = format_prompt(record.instruction, record.input, template, tokenizer)
    if template != "chat":
        return prompt, record.output
    messages = [_user_message(record.instruction, record.input), {"role": "assistant", "content": record.output}]
    conversation = _render_chat(tokenizer, messages, add_generation_prompt=False)
    if not conversation.startswith(prompt):
        raise UserError(f"--template chat: the chat template of {_tokenizer_name(tokenizer)} does not render a "
                        "conversation as prompt + reply, so the prompt cannot be masked; use --template alpaca")
    return prompt, conversation[len(prompt):].rstrip()


def _template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"--template {name}: unknown template; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _user_message(instruction: str, input: str) -> dict:
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--template chat: the tokenizer {_tokenizer_name(tokenizer)} has no chat template; "
                        "use --template alpaca or --template plain")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _chat_template_errors() as error:  # the template is the model's Jinja code: it can raise anything Jinja does
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"--template chat: {_tokenizer_name(tokenizer)}: its chat_template (tokenizer_config.json) "
                        f"fails: {first_line:.200} ({type(error).__name__}); fix it, or pass --template "
                        "alpaca") from None


def _chat_template_errors() -> tuple:
    """What rendering a chat template raises: Jinja's errors (its own ``raise_exception`` too), and a missing
    Jinja (transformers imports it only here)."""
    errors = [ImportError, TypeError, ValueError, KeyError, IndexError, AttributeError]
    try:
        from jinja2 import TemplateError
        errors.append(TemplateError)
    except ImportError:
        pass
    return tuple(errors)


def _tokenizer_name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
