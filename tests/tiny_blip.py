"""A tiny BLIP captioner built offline from a config and a word-level vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def tiny_blip(tmp: Path, words: list[str], image_size: int = 32, seed: int = 0):
    """(model, processor) of a random-weight BLIP: width 32, 2 layers, ``words`` vocabulary."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = SPECIALS + sorted(set(words))
    folder = tmp / "tiny_blip_tok"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers v5 ignores BertTokenizer(vocab_file=...): load from the folder.
    tok = BertTokenizer.from_pretrained(str(folder), bos_token="[DEC]")
    assert len(tok) == len(vocab), len(tok)
    ids = {t: vocab.index(t) for t in SPECIALS}
    cfg = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "encoder_hidden_size": 32, "max_position_embeddings": 40,
                     "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"],
                     "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]},
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg)
    proc = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                         tok)
    return model, proc


def teach(model, proc, images, captions, steps: int = 60, lr: float = 3e-3) -> float:
    """Overfit ``model`` to caption ``images`` as ``captions``; returns the final loss."""
    inputs = proc(images=images, text=captions, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].clone()
    labels[labels == proc.tokenizer.pad_token_id] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.loss.detach()
    model.eval()
    return float(loss)


def tiny_blip2(tmp: Path, words: list[str], image_size: int = 32, seed: int = 0):
    """(model, processor) of a random-weight BLIP-2 (OPT language model), word vocabulary."""
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<image>"] + sorted(set(words))
    folder = tmp / "tiny_blip2_tok"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(str(folder), bos_token="[CLS]", eos_token="[SEP]")
    assert len(tok) == len(vocab), len(tok)
    tok.image_token = "<image>"
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2}
    cfg = Blip2Config(
        vision_config={**small, "image_size": image_size, "patch_size": 8},
        qformer_config={**small, "encoder_hidden_size": 32, "vocab_size": len(vocab)},
        text_config={"model_type": "opt", "vocab_size": len(vocab), "hidden_size": 32,
                     "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "word_embed_proj_dim": 32, "max_position_embeddings": 64,
                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
                     "pad_token_id": tok.pad_token_id},
        num_query_tokens=4, image_token_index=vocab.index("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    proc = Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                          tok, num_query_tokens=4)
    return model, proc
