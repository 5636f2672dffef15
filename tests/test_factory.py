"""dnd.backends.factory: options checked before a factory runs, errors inside a factory
unchanged, the run's device reaching every backend (the LLM too), and backends that declare
the backends they need (the chat captioner's chat model)."""

from __future__ import annotations

import pytest
import torch

from dnd.backends.base import MIN_TOKENS, check_tokenizer_size
from dnd.backends.caption import ChatCaptioner
from dnd.backends.factory import Dependency, build, declare, describe_choices
from dnd.backends.openai_chat import OpenAIChat
from dnd.cli import main
from dnd.config import BackendConfig, ConfigError, load_config
from dnd.loading import backends_used, load_llm, load_models
from dnd.registry import Registry


class Made:
    """What the fake factories return: their arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _fake_registry() -> Registry:
    reg = Registry("widget")

    @reg.register("plain")
    def _plain(size: int = 1, *, colour: str = "red", device=None) -> Made:
        return Made(size=size, colour=colour, device=device)

    @reg.register("broken")
    def _broken(*, device=None) -> Made:
        return Made(device=device, oops=len(None))  # a bug inside the factory: TypeError

    @dataclass_options
    class Settings:
        depth: int = 2

    @reg.register("declared")
    @declare(options=Settings)
    def _declared(*, device=None, **settings) -> Made:
        return Made(device=device, **settings)

    @reg.register("needy")
    @declare(depends_on=(Dependency("helper", reg, default="plain"),))
    def _needy(helper, *, device=None, size: int = 0) -> Made:
        return Made(helper=helper, device=device, size=size)

    @reg.register("undeclared")
    def _undeclared(*, device=None, **kw) -> Made:
        return Made(device=device, **kw)

    return reg


def dataclass_options(cls):
    from dataclasses import dataclass

    return dataclass(frozen=True)(cls)


@pytest.fixture
def reg():
    return _fake_registry()


def test_unknown_option_names_backend_option_close_match_and_valid_ones(reg):
    with pytest.raises(ConfigError) as e:
        build(reg, BackendConfig("plain", {"colur": "blue", "weight": 3}), "cpu")
    msg = str(e.value)
    assert msg.startswith("widget 'plain' has no options 'colur' (did you mean colour?), "
                          "'weight';")
    assert msg.endswith("its options: colour, device, size")


def test_options_of_a_declared_dataclass_are_checked_and_passed(reg):
    made = build(reg, BackendConfig("declared", {"depth": 5}), "cpu")
    assert made.kwargs == {"device": torch.device("cpu"), "depth": 5}
    with pytest.raises(ConfigError, match=r"'dept' \(did you mean depth\?\); its options: "
                                          r"depth$"):
        build(reg, BackendConfig("declared", {"dept": 5}), "cpu")
    # 'device' is an option only where the declared options have it.
    with pytest.raises(ConfigError, match="widget 'declared' has no option 'device'"):
        build(reg, BackendConfig("declared", {"device": "cpu"}), "cpu")


def test_a_factory_with_undeclared_kwargs_is_refused(reg):
    with pytest.raises(TypeError, match="widget 'undeclared'.*declare"):
        build(reg, BackendConfig("undeclared", {"x": 1}), "cpu")


def test_a_type_error_inside_a_factory_propagates_as_itself(reg):
    with pytest.raises(TypeError) as e:
        build(reg, BackendConfig("broken"), "cpu")
    assert type(e.value) is TypeError and "NoneType" in str(e.value)
    assert "option" not in str(e.value)


def test_run_device_reaches_the_factory_unless_its_own_option_names_one(reg, monkeypatch):
    assert build(reg, BackendConfig("plain"), "cpu").kwargs["device"] == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    made = build(reg, BackendConfig("plain", {"size": 3}), "cuda")
    assert made.kwargs == {"size": 3, "colour": "red", "device": torch.device("cuda")}
    own = build(reg, BackendConfig("plain", {"device": "cpu"}), "cuda")
    assert own.kwargs["device"] == torch.device("cpu")


def test_a_dependency_is_built_first_from_the_needing_backends_options(reg):
    made = build(reg, BackendConfig("needy", {"size": 1, "helper_options": {"size": 7}}), "cpu")
    helper = made.kwargs["helper"]
    assert isinstance(helper, Made) and helper.kwargs["size"] == 7
    assert helper.kwargs["device"] == made.kwargs["device"] == torch.device("cpu")
    other = build(reg, BackendConfig("needy", {"helper": "declared",
                                               "helper_options": {"depth": 9}}), "cpu")
    assert other.kwargs["helper"].kwargs["depth"] == 9
    with pytest.raises(ConfigError, match="widget 'needy', helper_options: widget 'plain' has "
                                          "no option 'sise' \\(did you mean size\\?\\)"):
        build(reg, BackendConfig("needy", {"helper_options": {"sise": 1}}), "cpu")
    with pytest.raises(ConfigError, match="'helper_options' holds the options"):
        build(reg, BackendConfig("needy", {"helper_options": "size=1"}), "cpu")
    with pytest.raises(KeyError, match="unknown widget 'plian'; did you mean: plain"):
        build(reg, BackendConfig("needy", {"helper": "plian"}), "cpu")
    assert describe_choices(reg) == ("broken, declared, needy (with options helper, "
                                     "helper_options for its widget), plain, undeclared")


# ------------------------------------------------------------------ the shipped backends


@pytest.fixture
def chat_config(monkeypatch):
    """A run whose captioner is the chat captioner over an OpenAI-compatible server (the
    client is only built: nothing is sent)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return load_config(preset="toyworld", overrides={
        "stop_after": "captions",
        "captioner": {"name": "chat", "options": {
            "max_side": 256, "llm": "openai",
            "llm_options": {"model": "vision", "base_url": "http://127.0.0.1:9/v1"}}}})


def test_chat_captioner_gets_its_declared_chat_model(chat_config):
    models = load_models(chat_config, torch.device("cpu"))
    cap = models.captioner
    assert isinstance(cap, ChatCaptioner) and cap.max_side == 256
    assert isinstance(cap.llm, OpenAIChat)
    assert (cap.llm.config.model, cap.llm.config.base_url) == ("vision", "http://127.0.0.1:9/v1")
    assert cap.identity["backend"] == "chat" and cap.identity["llm"]["model"] == "vision"
    (llm_reg, llm), (cap_reg, own) = backends_used(chat_config)
    assert (llm_reg.kind, llm.name, llm.options["model"]) == ("llm", "openai", "vision")
    assert (cap_reg.kind, own) == ("captioner", BackendConfig("chat", {"max_side": 256}))


def test_chat_captioner_options_are_checked_including_its_llms(chat_config):
    import dataclasses

    def with_options(**options):
        return dataclasses.replace(chat_config, captioner=BackendConfig("chat", options))

    with pytest.raises(ConfigError, match=r"captioner 'chat', llm_options: llm 'openai' has "
                                          r"no option 'modle' \(did you mean model\?\)"):
        backends_used(with_options(llm_options={"modle": "x"}))
    # A setting of another captioner does nothing here: refused, not dropped.
    with pytest.raises(ConfigError, match="captioner 'chat' has no option 'device'"):
        backends_used(with_options(device="cpu"))
    with pytest.raises(ConfigError, match="captioner 'blip' has no option 'prompt_name'"):
        backends_used(dataclasses.replace(chat_config, captioner=BackendConfig(
            "blip", {"prompt_name": "caption_image.v1"})))


def test_the_runs_device_reaches_the_llm(monkeypatch):
    import dnd.backends.local_chat as llm_module

    seen = []

    class Spy:
        def __init__(self, config):
            seen.append(config)

    monkeypatch.setattr(llm_module, "TransformersChat", Spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = load_config(preset="toyworld", overrides={
        "summarizer": "llm", "llm.name": "transformers", "llm.options.model": "org/chat",
        "device": "cuda"})
    load_llm(config)
    assert seen[-1].device == "cuda" and seen[-1].model == "org/chat"
    load_llm(config, device="cpu")  # the caller's resolved device wins over config.device
    assert seen[-1].device == "cpu"
    own = load_config(preset="toyworld", overrides={
        "summarizer": "llm", "llm.name": "transformers", "llm.options.model": "org/chat",
        "llm.options.device": "cpu", "device": "cuda"})
    load_llm(own)
    assert seen[-1].device == "cpu"


def test_llm_settings_another_llm_takes_are_refused():
    config = load_config(preset="toyworld", overrides={
        "summarizer": "llm", "llm.name": "smollm2", "llm.options.model": "x"})
    with pytest.raises(ConfigError, match="llm 'smollm2' has no option 'model'"):
        load_llm(config)
    config = load_config(preset="toyworld", overrides={
        "summarizer": "llm", "llm.name": "transformers", "llm.options.model": "org/chat",
        "llm.options.base_url": "http://localhost:8000/v1"})
    with pytest.raises(ConfigError, match="llm 'transformers' has no option 'base_url'"):
        backends_used(config)


def test_llm_plus_consensus_runs_declare_their_llm():
    config = load_config(preset="toyworld", overrides={"summarizer": "llm+consensus",
                                                       "llm.name": "smollm2"})
    assert [r.kind for r, _ in backends_used(config)] == ["captioner", "llm", "generator",
                                                          "encoder"]


def test_consensus_extra_without_llm_plus_consensus_is_an_error():
    with pytest.raises(ConfigError, match="consensus_extra given, but summarizer 'llm'"):
        load_config(preset="toyworld", overrides={"summarizer": "llm",
                                                  "summarize.consensus_extra": 2})
    config = load_config(preset="toyworld", overrides={"summarizer": "llm+consensus",
                                                       "summarize.consensus_extra": 2})
    assert config.summarize.consensus_extra == 2


def test_one_tokenizer_size_threshold():
    # Empty offline loads: CLIPTokenizer 2 tokens, BertTokenizer 5; tiny test vocabularies 13+.
    for empty in (2, 5, MIN_TOKENS - 1):
        with pytest.raises(ValueError, match=f"only {empty} tokens"):
            check_tokenizer_size(empty, "org/model")
    check_tokenizer_size(13, "tiny")


def test_describe_help_lists_every_registered_backend(capsys):
    from dnd.backends import registered

    with pytest.raises(SystemExit):
        main(["describe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    caps, llms, gens, encs = registered()
    for flag, registry in (("--captioner", caps), ("--llm", llms), ("--generator", gens),
                           ("--encoder", encs)):
        listed = text.split(f"{flag} {registry.kind.upper()}.NAME ", 1)[1]
        assert listed.split(" (default")[0].endswith(describe_choices(registry)), flag
    assert "chat (with options llm, llm_options for its llm)" in text
