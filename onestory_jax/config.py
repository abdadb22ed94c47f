"""The config schema: frozen dataclasses, one per section of a preset, and their checks.

A preset is a YAML file in `configs/` whose top-level keys are the fields of `Config`; reading one (`base:`
inheritance, `key=value` overrides, type checks, old key paths) is `config_files.py`. The DiT has two sections:
`dit` (`DiTConfig`), the architecture a checkpoint fixes (and the LoRA adapter it carries), and `dit_runtime`
(`DiTRuntime`), how this run computes and stores it; the old paths `dit.<runtime field>` still read into
`dit_runtime` (`config_files.py: MOVED_KEYS`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from onestory_jax.errors import UserError

# The LoRA adapter on a DiT: a fine-tune may add one to a DiT that has none (models/lora.py).
DIT_ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")
LORA_TARGETS = ("q", "k", "v", "o", "k_img", "v_img", "fc1", "fc2")  # the blocks' linear layers
# Low-VRAM sampling switches of the DiT (models/lowvram.py): how its weights are stored and where, not what it computes.
DIT_LOWVRAM_FIELDS = ("weights_dtype", "fp8_layers", "offload")
FP8_LAYERS = {"ffn": ("fc1", "fc2"), "all": LORA_TARGETS}  # dit_runtime.fp8_layers -> the block layers stored in fp8


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The Wan2.1 DiT's architecture: what a converted or trained checkpoint fixes (its runtime settings are
    `DiTRuntime`). Defaults are Wan2.1-I2V-14B."""

    model_type: Literal["t2v", "i2v"] = "i2v"
    in_dim: int = 36
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int | None = 1280
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # LoRA on the blocks' linear layers named in `lora_targets` (q, k, v, o of self- and cross-attention,
    # k_img, v_img, fc1, fc2 of the FFN): y = x W + (lora_alpha / lora_rank) x A B. 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def architecture(self) -> DiTConfig:
        """This config with its LoRA adapter (DIT_ADAPTER_FIELDS) at the defaults: two DiTs with equal
        architectures hold the same base parameters and compute the same base function."""
        return dataclasses.replace(self, **{f: getattr(DiTConfig, f) for f in DIT_ADAPTER_FIELDS})

    @property
    def has_image_branch(self) -> bool:
        return self.model_type == "i2v"

    def validate(self) -> None:
        """Raise `UserError` for inconsistent settings."""
        if self.dim % self.num_heads:
            raise UserError(f"dit.dim={self.dim} is not divisible by dit.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"dit head dim {self.head_dim} must be even (3D RoPE works on pairs)")
        if self.model_type == "i2v" and not self.image_dim:
            raise UserError("dit.model_type=i2v needs dit.image_dim (the CLIP feature width)")
        if self.lora_rank < 0:
            raise UserError(f"dit.lora_rank must be >= 0, got {self.lora_rank}")
        if bad := [t for t in self.lora_targets if t not in LORA_TARGETS]:
            raise UserError(f"dit.lora_targets: {', '.join(bad)} not among {', '.join(LORA_TARGETS)}")


@dataclasses.dataclass(frozen=True)
class DiTRuntime:
    """How this run computes and stores the DiT: settings that change neither its parameters nor its function
    (up to rounding), free to change per run. YAML section `dit_runtime`; `dit.<field>` is read as its old name."""

    # Compute dtype of matmuls/attention; norms, modulation, time embedding and residuals stay fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Activation checkpointing per block: none | full | dots | dots_no_batch.
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Attention implementation: xla (reference), cudnn (flash on GPU), splash (flash on TPU), chunked,
    # auto (per backend; never full logits above 2 GiB).
    attention: Literal["xla", "cudnn", "splash", "chunked", "auto"] = "xla"  # models/layers.py: attention
    # Self-attention with a mesh `sequence` axis > 1: ulysses (all-to-all to heads; needs num_heads
    # divisible by sequence x tensor) or gspmd (XLA gathers keys and values along the sequence).
    sequence_parallel: Literal["ulysses", "gspmd"] = "ulysses"
    # Low VRAM (sampling; docs/performance.md "Low VRAM"). weights_dtype=fp8: the blocks' linear kernels named by
    # fp8_layers (ffn: fc1, fc2; all: also attention q, k, v, o, k_img, v_img) are stored as float8_e4m3fn with a
    # per-output-channel fp32 `scale` beside each, quantized at load and dequantized per layer before each matmul.
    weights_dtype: Literal["param", "fp8"] = "param"
    fp8_layers: Literal["ffn", "all"] = "ffn"
    # offload=blocks: the stacked block params live in host memory (memory kind pinned_host) and each layer is
    # moved to the device inside the layer scan, one layer at a time.
    offload: Literal["none", "blocks"] = "none"

    def plain(self) -> DiTRuntime:
        """These settings without the low-VRAM switches: the parameter tree as initialised, stored and loaded
        (before `models.lowvram.quantize_dit` and the host placement of `offload`)."""
        return dataclasses.replace(self, **{f: getattr(DiTRuntime, f) for f in DIT_LOWVRAM_FIELDS})


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """OneStory memory: Frame Selection and the Adaptive Conditioner."""

    num_queries: int = 16  # m learnable selector queries
    selector_heads: int = 8
    selector_stride: int = 4  # phi_V: strided conv, spatial /stride on the latent
    # phi_P's pooling of a frame's tokens into its embedding (the paper does not say): mean, or max, which keeps
    # a subject that covers a few tokens (docs/results.md: the toy world selector's top 3, 0.46 -> 0.85 on true frames).
    selector_pooling: Literal["mean", "max"] = "mean"
    selector_token_mlp: bool = False  # a residual MLP on each phi_V token (models/memory.py: TokenMLP)
    # Beyond the paper: each memory frame's tokens also carry its shot's caption (pooled, projected by phi_C),
    # so a returning character can be found by the caption of its first appearance when the drawn frames are
    # too coarse to show it (docs/design.md). Training examples and the sampler's bank then carry captions.
    selector_reads_captions: bool = False
    latent_channels: int = 16
    # Patchifier kernels on the latent, finest first; frames are assigned to them by rank.
    patchifier_kernels: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 8, 8), (1, 16, 16))
    # Frames per patchifier for one latent-frame budget (multiplied by `budget`).
    frames_per_patchifier: tuple[int, ...] = (2, 6, 5)
    budget: int = 1  # latent-frame equivalents of context tokens: 1, 2 or 3
    # How training picks the K conditioning frames (the paper's ablation trains each variant with its
    # own scheme, section 5.3): onestory = the selector's top-K; uniform, last_frame, none as in
    # models.memory.baseline_candidates; random = K random valid frames (training only: a base neutral
    # to every scheme). The selector learns from L_sel under every scheme.
    train_strategy: Literal["onestory", "uniform", "last_frame", "recent", "none", "random"] = "onestory"
    # I2V: shots after the first see the CLIP tokens of the start image (or of shot 1's first frame),
    # in training too. False: later shots get zero CLIP tokens, so memory is their only visual input.
    later_shots_see_first_image: bool = True

    def validate(self) -> None:
        if len(self.patchifier_kernels) != len(self.frames_per_patchifier):
            raise UserError("memory.patchifier_kernels and memory.frames_per_patchifier differ in length")
        if self.budget < 1:
            raise UserError(f"memory.budget must be >= 1, got {self.budget}")
        for k in self.patchifier_kernels:
            if k[0] != 1 or k[1] % 2 or k[2] % 2:
                raise UserError(f"memory patchifier kernel {k} must be (1, even, even)")


@dataclasses.dataclass(frozen=True)
class VAEStageConfig:
    """The `vae` training stage (the embedded default's VAE, `training/vae_stage.py`)."""

    clip_frames: int = 5  # synthetic clips of 1 + 4k frames
    clip_size: int = 64  # random crops of the 64x64 renders
    latent_noise: float = 0.1  # std of noise added to latents, so the decoder tolerates generated ones
    latent_penalty: float = 1e-3  # weight of mean(mu^2)
    character_crops: float = 0.0  # share of crops centred on a character (the small, identity-bearing part)
    # weight of the still-clip term: one frame held still must encode to the first frame's latent in every
    # latent frame, so a memory frame and a target frame share one code whatever their place in a shot
    still_consistency: float = 0.0
    # weight of the keyframe term: latent frame k of a clip must be the image code of its frame 4k (that frame
    # encoded alone), so every latent frame holds one instant in the code of a shot's first frame
    keyframe_consistency: float = 0.0
    # the keyframe term's image codes are those of the VAE the stage starts from (train.init_from), held frozen,
    # not the trained VAE's own (which drift with it)
    keyframe_teacher: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and OneStory training recipe (paper section 5; DESIGN.md defaults)."""

    # onestory: DiT + memory modules on prepared records; vae: the small VAE of the embedded default
    # on synthetic story clips (it also writes the frozen random text/image encoders beside it).
    stage: Literal["onestory", "vae"] = "onestory"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    lr_warmup_steps: int = 100
    grad_clip: float = 1.0
    selection_weight: float = 0.5  # lambda in L = L_shot + lambda * L_sel
    # Share of memory frames the selector sees degraded (3x3 blur + noise, training/losses.py degrade_frames):
    # at sampling time it reads generated frames, coarser than the records' (the DiT's context stays intact).
    selector_degrade: float = 0.0
    decoupled_warmup: float = 0.1  # fraction of steps conditioned on uniform frames of the real prior shot
    text_dropout: float = 0.1
    context_dropout: float = 0.1
    timestep_shift: float = 3.0  # shifted-uniform training sigmas
    ema_decay: float = 0.0  # 0 = no EMA
    # Regexes over '/'-joined param paths; only matching params train (empty = everything).
    trainable: tuple[str, ...] = ()
    data: str = ""  # prepared records (ArrayRecord file)
    # A model folder (docs/model-folder.md: a converted Wan2.1 release, models/demo, a run's export) whose
    # DiT starts the run (same DiT architecture), and its memory modules when it has them (else they start
    # as sample.py initialises them). The vae stage starts from its VAE instead. Empty: random init, which
    # a DiT of 1B+ parameters refuses unless `from_scratch` (OneStory fine-tunes Wan2.1-I2V).
    init_from: str = ""
    from_scratch: bool = False
    # With dit.lora_rank > 0: the export folds the LoRA into the DiT's kernels (a plain DiT), or keeps it
    # beside them (false; the export's config keeps dit.lora_*). sample.py reads both.
    merge_lora: bool = True
    insertion_prob: float = 0.5  # two-shot videos: S_syn from another video (else the augmented first shot)
    swap_order_prob: float = 0.5  # (S_syn, S_first) instead of (S_first, S_syn)
    # Real triplets: consecutive shots, or recall = the target's latest earlier appearance + the shot before it
    memory_pick: Literal["consecutive", "recall"] = "consecutive"
    first_shot_prob: float = 0.0  # I2V: share of examples that generate shot 1 from its first frame, no memory
    # L_shot weighs each latent cell 1 + W x the share of it characters cover (records with character_cells,
    # i.e. synthetic stories; others weigh 1): the character, a small part of a frame, carries identity.
    character_loss_weight: float = 0.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    val_every: int = 0  # validation loss in sigma buckets every N steps (0 = off); workdir/val.csv
    val_batches: int = 2  # held-out batches per validation
    vae_stage: VAEStageConfig = VAEStageConfig()  # read by the vae stage only

    def validate(self) -> None:
        for name in (
            "text_dropout",
            "context_dropout",
            "decoupled_warmup",
            "insertion_prob",
            "swap_order_prob",
            "selector_degrade",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"train.{name} must be in [0, 1], got {v}")
        if self.character_loss_weight < 0:
            raise UserError(f"train.character_loss_weight must be >= 0, got {self.character_loss_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.steps < 1 or self.batch_size < 1:
            raise UserError("train.steps and train.batch_size must be >= 1")
        if self.val_every < 0 or self.val_batches < 1:
            raise UserError(f"train.val_every must be >= 0 and train.val_batches >= 1, got {self.val_every}, {self.val_batches}")
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"train.trainable: {pattern!r} is not a valid regex ({e})") from None


# --- VAE ---

# Published per-channel statistics of Wan2.1 VAE latents (z = (mu - mean) / std).
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The Wan2.1 causal 3D VAE (diffusers `AutoencoderKLWan` knobs). Defaults are the released VAE.

    Empty `latents_mean` / `latents_std` mean identity normalisation (for tiny test configs).
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # only [] exists in Wan2.1 (diffusers and original differ otherwise)
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # the VAE is frozen: inference only
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params and norms stay fp32
    # Low VRAM: decode in spatial tiles of `tile` x `tile` pixels (stride 3/4 tile, the overlap blended linearly,
    # as diffusers' AutoencoderKLWan.enable_tiling: 256 / 192 there), each tile over all frames with its own
    # causal cache; 0 = whole frames. A multiple of 4 x the spatial factor (32 for Wan2.1).
    tile: int = 0

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def validate(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise UserError(
                f"vae.temperal_downsample needs {len(self.dim_mult) - 1} entries (len(dim_mult) - 1), "
                f"got {len(self.temperal_downsample)}"
            )
        if 4 % self.temporal_factor:
            raise UserError(f"vae temporal factor {self.temporal_factor} must divide the 4-frame encode chunk")
        if self.attn_scales:
            raise UserError("vae.attn_scales must be empty (the Wan2.1 VAE has attention only in its middle blocks)")
        if self.dropout != 0.0:
            raise UserError("vae.dropout must be 0 (the VAE runs inference only)")
        for name in ("latents_mean", "latents_std"):
            n = len(getattr(self, name))
            if n not in (0, self.z_dim):
                raise UserError(f"vae.{name} has {n} values; expected z_dim={self.z_dim} or none (identity)")
        if bool(self.latents_mean) != bool(self.latents_std):
            raise UserError("vae.latents_mean and vae.latents_std must be given together")
        if any(s <= 0 for s in self.latents_std):
            raise UserError("vae.latents_std values must be positive")
        if self.tile < 0 or self.tile % (4 * self.spatial_factor):
            raise UserError(
                f"vae.tile must be 0 (off) or a positive multiple of {4 * self.spatial_factor} "
                f"(4 x the spatial factor: the 3/4 stride is whole latents), got {self.tile}"
            )


# --- text and image encoders ---


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The umT5 encoder (Wan's text encoder). Defaults are google/umt5-xxl."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512  # tokens per prompt: longer prompts are truncated, outputs zero-padded to this
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; norms and residuals stay fp32
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Low VRAM (sampling): mesh = on the model's devices; cpu = loaded and run on the host CPU (jax's cpu backend),
    # never on the accelerator (captions are encoded once per story, before the DiT runs).
    device: Literal["mesh", "cpu"] = "mesh"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def validate(self) -> None:
        buckets = self.relative_attention_num_buckets
        if buckets < 4 or buckets % 2:
            raise UserError(f"text_encoder.relative_attention_num_buckets must be even and >= 4, got {buckets}")
        if self.relative_attention_max_distance <= buckets // 4:
            raise UserError("text_encoder.relative_attention_max_distance must exceed relative_attention_num_buckets / 4")
        if self.text_len < 2:
            raise UserError(f"text_encoder.text_len must be >= 2 (a token and </s>), got {self.text_len}")


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    """The CLIP vision tower Wan I2V uses (features of the penultimate block). Defaults are ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32  # depth of the tower; features come after num_layers - 1 blocks
    num_heads: int = 16
    eps: float = 1e-5
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # the MLP's: Wan's tower exact GELU; transformers' CLIP default quick_gelu
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; norms and residuals stay fp32
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def num_tokens(self) -> int:
        """Class token + patches (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(f"image_encoder.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"image_encoder.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_layers < 2:
            raise UserError("image_encoder.num_layers must be >= 2 (features are the penultimate block's)")


# --- sampler ---


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The model's denoising sampler and default shot size; a story's `settings` override any of these
    fields. Defaults are Wan2.1 I2V-480P: UniPC on Wan's sigma grid, 40 steps, shift 3, CFG 5, 832x480x81."""

    solver: Literal["unipc", "euler"] = "unipc"
    steps: int = 40
    shift: float = 3.0
    guidance: float = 5.0  # classifier-free guidance scale on text (1.0: no unconditional pass)
    negative_prompt: str = ""  # "": the null text (all-zero embedding) that training drops captions to
    cache: float = 0.0  # step caching threshold (diffusion/loop.py; 0 = off: every step runs the DiT)
    # Guidance on the memory: the velocity moves away from the one with every context token hidden (as
    # training's context dropout hides them) by this scale; 1 = off, a third DiT pass per step when on.
    memory_guidance: float = 1.0
    # A story's default shot size: the size the model was trained at (train.py exports its data's).
    width: int = 832
    height: int = 480
    frames: int = 81  # per shot, 4k + 1
    fps: int = 16

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"sampler.steps must be >= 1, got {self.steps}")
        if min(self.width, self.height, self.fps) < 1 or self.frames < 1 or (self.frames - 1) % 4:
            raise UserError(
                f"sampler: width, height and fps must be >= 1 and frames 4k+1, got "
                f"{self.width}x{self.height}x{self.frames} at {self.fps} fps"
            )
        if self.shift <= 0:
            raise UserError(f"sampler.shift must be > 0, got {self.shift}")
        if self.cache < 0:
            raise UserError(f"sampler.cache must be >= 0 (0 = off), got {self.cache}")
        if self.memory_guidance < 0:
            raise UserError(f"sampler.memory_guidance must be >= 0 (1 = off), got {self.memory_guidance}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis means 'all remaining devices'."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """The root config: model plus the device mesh."""

    name: str = "custom"
    dit: DiTConfig = DiTConfig()
    dit_runtime: DiTRuntime = DiTRuntime()
    memory: MemoryConfig = MemoryConfig()
    vae: VAEConfig = VAEConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    sampler: SamplerConfig = SamplerConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def validate(self) -> Config:
        self.dit.validate()
        self.memory.validate()
        self.vae.validate()
        self.text_encoder.validate()
        self.image_encoder.validate()
        if self.text_encoder.d_model != self.dit.text_dim:
            raise UserError(f"text_encoder.d_model={self.text_encoder.d_model} != dit.text_dim={self.dit.text_dim}")
        if self.dit.has_image_branch and self.image_encoder.hidden_size != self.dit.image_dim:
            raise UserError(f"image_encoder.hidden_size={self.image_encoder.hidden_size} != dit.image_dim={self.dit.image_dim}")
        self.sampler.validate()
        self.train.validate()
        self._check_ulysses()
        return self

    def _check_ulysses(self) -> None:
        """Ulysses splits the heads over sequence x tensor devices: they must divide num_heads."""
        split = self.mesh.sequence * self.mesh.tensor
        if (
            self.dit_runtime.sequence_parallel == "ulysses"
            and self.mesh.sequence > 1
            and self.mesh.tensor > 0
            and self.dit.num_heads % split
        ):
            raise UserError(
                f"dit.num_heads={self.dit.num_heads} is not divisible by mesh.sequence={self.mesh.sequence}"
                f" x mesh.tensor={self.mesh.tensor} (Ulysses splits the heads over them); change"
                " the mesh or set dit_runtime.sequence_parallel=gspmd"
            )
