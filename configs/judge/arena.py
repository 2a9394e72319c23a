"""`hibari judge`: answers of several models to one prompt set, graded by a judge model.

    hibari judge --config configs/judge/arena.py --out runs/judge            # smollm2 (default)
    hibari judge --config configs/judge/arena.py:quickstart --out runs/qs-judge
    hibari judge --config configs/judge/arena.py --out runs/judge \\
        --config.gguf=/models/SmolLM2-135M-Instruct.Q4_1.gguf --config.prompts.seed.limit=8

Variants: `smollm2` (the judge is SmolLM2-135M-Instruct, a GGUF file at `gguf`; contestants:
SmolLM2 itself and the quickstart's SFT and DPO models) and `quickstart` (the quickstart's SFT
and DPO models, the SFT model judging; `quickstart_config(sft_dir, dpo_dir)` from Python).

Fields (evaluation/arena.py reads them):
  prompts.<source>      path, format (seed_tasks | nq_open | asdiv | jsonl), limit (0 = all),
                        category, enabled; prompt ids are "<source>/<index>"
  contestants.<name>    checkpoint (run / params / HF dir or .gguf), tokenizer ("" = beside the
                        checkpoint), template ({name, with_input, without_input}: `template()`
                        below makes it from an align template name or dict), prefix (auto |
                        bos | eos | none), stop (extra stop strings), enabled; in the order this
                        file defines them
  generation            max_new_tokens, temperature, top_k, top_p, seed, batch_size, stop
  judge                 name, checkpoint, tokenizer, template, prefix, batch_size, max_len
                        (0 = the model's), pairwise_primer, single_primer, contestant (the
                        contestant that is the judge model: "" = the one with the same
                        checkpoint, "none" = no self-enhancement measurement)
  pairwise.reference    both | with | without (MT-bench's reference-guided grading)
  single                enabled, low, high, reference
  verbosity             n (answers padded; 0 = skip), repeat (restatements appended)
  ratings               bootstrap_rounds, seed, elo_k, prior (Bradley-Terry pseudo-ties)
"""
from __future__ import annotations

import ml_collections

from hibari.align.templates import ChatTemplate, as_chat, get_template

VARIANTS = ("smollm2", "quickstart")

# SmolLM2-Instruct's ChatML turn format: <|im_start|> / <|im_end|> are single special tokens of
# its tokenizer; generation stops at <|im_end|>.
SMOLLM2_CHATML = dict(
    name="smollm2_chatml",
    with_input="<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
    without_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
CHATML_STOP = ["<|im_end|>"]
ALPACA_STOP = ["\n### "]  # an Alpaca-tuned model that runs on into a next "### Instruction:"


def template(spec) -> ml_collections.ConfigDict:
    """An align template (a name such as "alpaca_en" or "chat", or a {name, with_input,
    without_input} dict) as the {name, with_input, without_input} format strings that
    evaluation/arena.py renders (the evaluation room does not import align/)."""
    tpl = get_template(spec)
    mark_i, mark_x = "\x00instruction\x00", "\x00input\x00"

    def prompt(record: dict) -> str:
        if isinstance(tpl, ChatTemplate):
            record = as_chat(record, with_output=False)
        text = "".join(s.text for s in tpl.prompt(record))
        text = text.replace("{", "{{").replace("}", "}}")
        return text.replace(mark_i, "{instruction}").replace(mark_x, "{input}")
    return ml_collections.ConfigDict(dict(
        name=tpl.name, with_input=prompt({"instruction": mark_i, "input": mark_x}),
        without_input=prompt({"instruction": mark_i})))


def source(path: str, format: str, limit: int = 0, category: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(path=path, format=format, limit=limit,
                                          category=category, enabled=True))


def contestant(checkpoint, template_spec, stop=(), tokenizer: str = "", prefix: str = "auto"
               ) -> ml_collections.ConfigDict:
    """`checkpoint` may be a FieldReference (several fields naming one file); `template_spec`
    an align template name or dict (`template`)."""
    c = ml_collections.ConfigDict(dict(tokenizer=tokenizer, prefix=prefix, stop=list(stop),
                                       enabled=True))
    c.checkpoint = checkpoint
    c.template = template(template_spec)
    return c


def base_config(seed_tasks: int, nq_open: int, asdiv: int) -> ml_collections.ConfigDict:
    """Prompts, generation, the judging modes and ratings; the contestants and the judge's
    checkpoint and template are the variant's."""
    c = ml_collections.ConfigDict()
    c.name = "judge"
    c.prompts = ml_collections.ConfigDict()
    c.prompts.seed = source("align/assets/seed_tasks.jsonl", "seed_tasks", seed_tasks,
                            "open-ended")
    c.prompts.nq = source("evaluation/tasks/data/nq_open_facts.jsonl", "nq_open", nq_open,
                          "open QA")
    c.prompts.asdiv = source("evaluation/tasks/data/asdiv_sample.jsonl", "asdiv", asdiv, "math")
    c.contestants = ml_collections.ConfigDict()
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, batch_size=8, stop=[]))
    c.judge = ml_collections.ConfigDict(dict(
        name="judge", checkpoint="", tokenizer="", prefix="auto", batch_size=8, max_len=0,
        pairwise_primer="The better answer is Answer", single_primer="Rating:", contestant=""))
    c.pairwise = ml_collections.ConfigDict(dict(reference="both"))
    c.single = ml_collections.ConfigDict(dict(enabled=True, low=1, high=5, reference="both"))
    c.verbosity = ml_collections.ConfigDict(dict(n=24, repeat=2))
    c.ratings = ml_collections.ConfigDict(dict(bootstrap_rounds=1000, seed=0, elo_k=4.0,
                                               prior=0.5))
    return c


def smollm2_config() -> ml_collections.ConfigDict:
    c = base_config(seed_tasks=24, nq_open=16, asdiv=16)
    c.name = "judge-smollm2"
    c.gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the judge and the smollm2 contestant
    c.contestants.smollm2 = contestant(c.get_ref("gguf"), SMOLLM2_CHATML, CHATML_STOP)
    c.contestants.sft = contestant("runs/quickstart/sft", "alpaca_en", ALPACA_STOP)
    c.contestants.dpo = contestant("runs/quickstart/dpo", "alpaca_en", ALPACA_STOP)
    c.judge.name = "SmolLM2-135M-Instruct"
    c.judge.checkpoint = c.get_ref("gguf")
    c.judge.template = template(SMOLLM2_CHATML)
    return c


def quickstart_config(sft_dir: str, dpo_dir: str, judge_checkpoint: str | None = None,
                      judge_template=None) -> ml_collections.ConfigDict:
    """The quickstart's optional judge stage: its SFT and DPO models answer 12 seed tasks, 8
    NQ-open questions and 8 ASDiv problems (48 new tokens); the judge is the SFT model itself
    (so self-enhancement is measured) unless `judge_checkpoint` is given (its template: ChatML
    for a .gguf file, else Alpaca, unless `judge_template`)."""
    c = base_config(seed_tasks=12, nq_open=8, asdiv=8)
    c.name = "judge-quickstart"
    c.generation.max_new_tokens = 48
    c.verbosity.n = 8
    c.ratings.bootstrap_rounds = 200
    c.contestants.sft = contestant(str(sft_dir), "alpaca_en", ALPACA_STOP)
    c.contestants.dpo = contestant(str(dpo_dir), "alpaca_en", ALPACA_STOP)
    if judge_checkpoint:
        gguf = str(judge_checkpoint).endswith(".gguf")
        c.judge.name = "judge"
        c.judge.checkpoint = str(judge_checkpoint)
        c.judge.template = template(judge_template or (SMOLLM2_CHATML if gguf else "alpaca_en"))
    else:
        c.judge.name = "sft"
        c.judge.checkpoint = str(sft_dir)
        c.judge.template = template(judge_template or "alpaca_en")
    return c


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/judge/arena.py: unknown variant {variant!r}; choose from "
                         f"{VARIANTS}")
    if variant == "quickstart":
        return quickstart_config("runs/quickstart/sft", "runs/quickstart/dpo")
    return smollm2_config()
