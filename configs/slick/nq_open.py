"""SliCK knowledge probe (Gekhman et al., 2024) on the 200 vendored NQ-open facts.

    hibari slick --config configs/slick/nq_open.py --checkpoint runs/small --out slick_out
    hibari slick --config configs/slick/nq_open.py:paper --checkpoint model.gguf --out OUT \\
        --config.facts.limit=0 --config.match=contains

Variants: cpu (the default: 4 prompts of k=4 exemplars, 4 samples per prompt at T=0.5, the first
50 facts; minutes on a CPU for a 135M model) and paper (the paper's N_ex=10 prompts of k=4
exemplars, 16 samples per prompt at T=0.5, every fact). `hibari.evaluation.slick` documents the
categories and the outputs.
"""
import ml_collections

VARIANTS = ("cpu", "paper")


def get_config(arg: str = ""):
    variant = arg or "cpu"
    if variant not in VARIANTS:
        raise ValueError(f"configs/slick/nq_open.py: unknown variant {variant!r}; choose from "
                         f"{VARIANTS}")
    paper = variant == "paper"
    c = ml_collections.ConfigDict()
    c.name = f"slick-nq_open-{variant}"
    # the model: any checkpoint hibari.evaluation.lm.load_lm reads (a hibari run or params
    # export, an HF directory, a .gguf file); --checkpoint sets it
    c.checkpoint = ""
    c.tokenizer = ""  # "" = found beside the checkpoint
    c.prefix = "auto"  # auto | bos | eos | none: what goes before each prompt
    c.allow_tokenizer_mismatch = False
    c.max_len = 0  # context limit in tokens; 0 = the model's max_seq_len
    c.batch_size = 16  # greedy prompts per forward batch (greedy answers do not depend on it)
    c.facts = ml_collections.ConfigDict(dict(
        path="evaluation/tasks/data/nq_open_facts.jsonl",
        # nq_open: {"question", "answer": [gold, ...]} per line; jsonl: {"question",
        # "answer" | "answers": gold or [gold, ...], optional "id"}
        format="nq_open",
        limit=0 if paper else 50,  # the first `limit` facts after `offset`; 0 = all
        offset=0))
    # the exemplar pool: the whole file, never the probed fact itself; "" = facts.path/format
    c.pool = ml_collections.ConfigDict(dict(path="", format=""))
    c.n_prompts = 10 if paper else 4  # N_ex few-shot prompts per fact
    c.k = 4  # exemplars per prompt
    c.samples = 16 if paper else 4  # sampled answers per prompt at `temperature`
    c.temperature = 0.5
    c.max_new_tokens = 16  # answers end at the first newline
    c.seed = 0  # exemplar draws and the sampled answers
    c.template = "Q: {question}\nA:"  # an exemplar is the template + " " + its first gold
    c.match = "exact"  # exact (the paper's EM after normalisation) | contains (gold in answer)
    c.chunk_facts = 8  # facts whose greedy prompts go into one generate call (and one save)
    c.progress_every = 10.0  # seconds between progress lines on stderr
    return c
