"""`hibari quickstart`: the whole pipeline on the vendored bilingual corpus, sized for a CPU.

    hibari quickstart --out runs/quickstart                          # default: ~5 min, 2 cores
    hibari quickstart --out runs/qs-ci --config configs/quickstart.py:ci   # ~2 min (the CI test)

Each stage is an ordinary hibari run built from another config file plus the overrides below,
so every stage can be rerun alone with the command the report prints:
  data      configs/data/quickstart.py fields (clean, filter, dedup, tokenizer, packing)
  pretrain  configs/pretrain/llama.py:small + `pretrain` overrides, on the packed rows
  sft       configs/sft/instruct.py:<template> + `sft` overrides, from the pretrained model
  dpo       configs/dpo/pairs.py:dpo + `dpo` overrides, from the SFT model
  eval      each model: held-out bits per byte (en, ja), multiple choice, response-token loss
            on SFT's held-out instructions, preference accuracy on DPO's held-out pairs, greedy
            answers to `prompts`
"""
import ml_collections

SIZES = ("default", "ci")


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"configs/quickstart.py: unknown size {size!r}; choose from {SIZES}")
    ci = size == "ci"
    c = ml_collections.ConfigDict()
    c.name = f"quickstart-{size}"
    c.seed = 0

    # Fields of configs/data/quickstart.py (data.pipeline.PrepareConfig); `out` is <out>/data.
    c.data = ml_collections.ConfigDict(dict(
        base="configs/data/quickstart.py",
        tokenizer_vocab_size=8000,
        seq_len=512))

    # 1.98M parameters (1.54M of them the 8000-piece embeddings): 1.2M tokens, 1.3 epochs.
    shape = (dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=192) if ci
             else dict(d_model=96, n_layers=4, n_heads=3, n_kv_heads=3, head_dim=32, d_ff=256))
    c.pretrain = ml_collections.ConfigDict(dict(
        base="configs/pretrain/llama.py:small",
        overrides=dict(
            steps=30 if ci else 300,
            model=shape,
            data=dict(batch_size=8),
            optim=dict(lr=3e-3),
            eval_batches=4 if ci else 12,
            log_every=5 if ci else 10,
            eval_every=10 if ci else 50,
            checkpoint_every=10 if ci else 100)))

    c.sft = ml_collections.ConfigDict(dict(
        base="configs/sft/instruct.py:alpaca_en",
        overrides=dict(
            steps=8 if ci else 60,
            # 20% of the seed tasks held out (26 of the 163 that fit): SFT's effect on their
            # response-token loss is measured with a standard error over examples
            data=dict(seq_len=512, batch_size=8, eval_fraction=0.2),
            optim=dict(lr=1e-3),
            log_every=2 if ci else 5,
            eval_every=4 if ci else 20,
            checkpoint_every=4 if ci else 20)))

    c.dpo = ml_collections.ConfigDict(dict(
        base="configs/dpo/pairs.py:dpo",
        overrides=dict(
            steps=6 if ci else 40,
            beta=0.1,
            reference="precomputed",
            # 93 of the 150 pairs (align/assets/seed_pairs.jsonl: chosen = the real answer,
            # rejected = it stopped before its last word) fit 512 tokens; 20% held out
            data=dict(template="alpaca_en", seq_len=512, batch_size=8, eval_fraction=0.2),
            optim=dict(lr=1e-4),  # 5e-4 overfit the earlier pairs within 10 steps
            log_every=2 if ci else 5,
            eval_every=3 if ci else 10,
            checkpoint_every=3 if ci else 20)))

    c.eval = ml_collections.ConfigDict(dict(
        tasks=("commonsense_qa_sample", "piqa_sample"),  # vendored task names or YAML paths
        limit=8 if ci else 0,                           # examples per task; 0 = all
        heldout_docs=4 if ci else 0,                    # held-out documents per language; 0 = all
        batch_size=8,
        max_new_tokens=16 if ci else 48))

    # Optional stages, run after eval with `hibari quickstart --with judge slick`:
    # judge  the SFT and DPO models answer seed tasks, NQ-open questions and ASDiv problems; a
    #        judge model grades them (configs/judge/arena.py:quickstart + `overrides`); `checkpoint`
    #        "" = the SFT model judges (it is also a contestant: self-enhancement is measured)
    # slick  SliCK categories of NQ-open facts for one of the trained models
    c.judge = ml_collections.ConfigDict(dict(
        config="configs/judge/arena.py:quickstart",
        checkpoint="",
        overrides=dict(
            prompts=dict(seed=dict(limit=3), nq=dict(limit=2), asdiv=dict(limit=2)),
            generation=dict(max_new_tokens=16), verbosity=dict(n=2),
            ratings=dict(bootstrap_rounds=50)) if ci else dict()))
    c.slick = ml_collections.ConfigDict(dict(
        config="configs/slick/nq_open.py:cpu",
        model="dpo",
        overrides=dict(facts=dict(limit=3 if ci else 24), n_prompts=2 if ci else 4,
                       samples=2 if ci else 4)))

    # Greedy completions shown in the report: `text` prompts are continued as they are,
    # `instruction` prompts go through the SFT template (the format SFT and DPO trained on).
    c.prompts = ml_collections.ConfigDict(dict(
        text=("The history of the city", "日本の四季は") if not ci else ("The history of",),
        instruction=(("Give three tips for staying healthy.",
                      "Write a short poem about the sea.",
                      "日本で一番高い山は何ですか。") if not ci else ("Give three tips for staying healthy.",))))
    return c
