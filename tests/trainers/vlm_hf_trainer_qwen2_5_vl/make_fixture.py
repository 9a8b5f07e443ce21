"""Generate the vision-language transformers-Trainer FSDP2 fixtures (README contract in ../README.md, plus the
multimodal extensions described under "Outputs" below).

This one script writes three sibling fixture folders (each: base/ + run/ + save_pretrained/ + reference.pt):

  vlm_hf_trainer_qwen2_5_vl/  transformers Trainer, FSDP2 (fully_shard), SHARDED_STATE_DICT,
                              Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL ViT with window attention + merger)
  vlm_hf_trainer_llava/       transformers Trainer, FSDP2, SHARDED_STATE_DICT,
                              LlavaForConditionalGeneration (CLIP vision tower + Llama text model)
  vlm_hf_trainer_gemma3/      transformers Trainer, FSDP2, FULL_STATE_DICT,
                              Gemma3ForConditionalGeneration (SigLIP vision tower + Gemma3 text model, tied lm_head)

The other folders' make_fixture.py are relative links here: run through one, the script writes that folder only.

Versions used (pip freeze, CPU-only machine, Python 3.11.7):
  torch==2.13.0+cpu  transformers==5.24.0  accelerate==1.15.0  torchvision==0.28.0+cu130 (see the shim below)
  safetensors==0.8.0  tokenizers==0.23.3  huggingface_hub==2.4.0  numpy==2.4.6  pillow==13.0.0

Recreate the venv and run (from the repo root; about 1 minute per folder on 2 shared CPU cores):
  python3 -m venv /work/venvs/vlm
  /work/venvs/vlm/bin/pip install torch==2.13.0          # first: the local CPU build
  /work/venvs/vlm/bin/pip install transformers==5.24.0 accelerate==1.15.0 pillow
  /work/venvs/vlm/bin/pip install --no-deps torchvision==0.28.0   # --no-deps: keep the CPU torch
  HF_HUB_OFFLINE=1 /work/venvs/vlm/bin/python tests/trainers/vlm_hf_trainer_qwen2_5_vl/make_fixture.py [VARIANT ...]
(no VARIANT = all three; tests/trainers/VARIANT/make_fixture.py = that one).

torchvision shim: transformers 5.24's default ("torchvision backend") image processors and the Qwen2-VL video
processor import torchvision, but only use its pure-Python transforms (torchvision.transforms.v2.functional).
The torchvision wheel built for torch 2.13.0 on the package index (0.28.0) is a CUDA build: its compiled
torchvision/_C.so does not load against the CPU torch, and `import torchvision` then dies in
torchvision/_meta_registrations.py with "RuntimeError: operator torchvision::nms does not exist"
(register_fake for an op whose schema only _C.so would have defined). tv_shim() below defines the two op
schemas that module registers fake kernels for at import time (torchvision::nms, torchvision::qnms) with
torch.library.Library("torchvision", "DEF") before the first torchvision import; nothing calls them (no
kernels are registered, torchvision.extension._has_ops() stays False). Loading base/ with AutoProcessor needs
the same shim (or a working torchvision); the images themselves only go through resize/rescale/normalize.

Each run, per family:
  * base/ is built first (main process): a tiny byte-level BPE tokenizer trained offline with the `tokenizers`
    library on the word list below plus the family's special tokens (image/video/turn tokens), wrapped in
    PreTrainedTokenizerFast; the family's processor (image processor sized for 28 or 32 px, Qwen2-VL video
    processor for Qwen2.5-VL) with a compact chat template in the family's format; the tiny config (see
    tiny_config()); model.from_config under torch.manual_seed, fp32; model.save_pretrained + processor
    .save_pretrained into base/ (generation_config.json dropped). AutoProcessor.from_pretrained(base) and
    AutoConfig.from_pretrained(base) are asserted to load.
  * 16 training examples (2 ranks x batch 2 x 4 steps): a random RGB image (seeded uint8 noise) and random words
    as a user/assistant chat, rendered with processor.apply_chat_template and encoded by the processor
    (padding="max_length" to the longest example); labels = input_ids with pad and image tokens set to -100. A collator concatenates
    the processor's per-example tensors along dim 0 (Qwen2.5-VL's pixel_values are (num_patches, 3*2*4*4)
    rows, image_grid_thw (num_images, 3)).
  * The model is loaded with from_pretrained(base/, dtype=float32) on both ranks; Trainer(model, args,
    train_dataset, data_collator, processing_class=processor), AdamW lr 1e-2 with linear decay, 2 ranks x batch
    2, 4 optimizer steps, checkpoint every 2 steps (checkpoint-2, checkpoint-4), fsdp_config
    {"version": 2, "state_dict_type": ..., "transformer_layer_cls_to_wrap": decoder layer + vision block
    classes}, remove_unused_columns=False. No final trainer.save_model() (keeps the fixture small).

Tiny configs (tiny_config(); all fp32, text hidden 32 / intermediate 32 / 2 layers / 2 heads / 1 kv head,
vocab = len(tokenizer) = 129, odd so FSDP shards are uneven):
  qwen2_5_vl  vision depth 1, hidden 16 (the merger MLP is (hidden*4)^2), 2 heads, patch 4, temporal patch 2,
              spatial merge 2, window_size 16 (window attention, fullatt_block_indexes=[]), out_hidden 32;
              32x32 images -> image_grid_thw [1, 8, 8] -> 64 patches (pixel_values [64, 96]) -> 16 image tokens;
              text mrope_section [4, 2, 2], untied lm_head
  llava       CLIPVisionConfig 1 layer, hidden 32, 2 heads, image 28, patch 7 (16 patches + CLS; strategy
              "default" drops CLS -> 16 image tokens), vision_feature_layer -1, gelu projector; LlamaConfig text,
              untied lm_head
  gemma3      SiglipVisionConfig 2 layers, hidden 32, 2 heads, image 28, patch 7, no head; mm_tokens_per_image 4
              (4x4 patches avg-pooled to 2x2); Gemma3TextConfig head_dim 16, query_pre_attn_scalar 16, sliding
              window 16, layer_types [sliding, full]; tie_word_embeddings=True

Key names (transformers 5.24): the checkpoints hold the module names (DCP: "model." + named_parameters, e.g.
model.model.visual.blocks.0.attn.qkv.weight, model.model.language_model.layers.0..., model.lm_head.weight;
pytorch_model_fsdp.bin: model.vision_tower..., model.language_model..., lm_head.weight), while save_pretrained
(base/, save_pretrained/, a FULL checkpoint's model.safetensors) writes the families' legacy on-disk names
(Qwen2.5-VL: visual.*, model.layers.*, model.embed_tokens.weight, lm_head.weight; Llava / Gemma3:
vision_tower.*, multi_modal_projector.*, language_model.model.*, Llava language_model.lm_head.weight; Gemma3's
tied lm_head is not written by save_pretrained but is in pytorch_model_fsdp.bin and in the checkpoint's
model.safetensors).

CPU workarounds (copied from ../hf_trainer_fsdp2_sharded/make_fixture.py; the trainer's save code is untouched):
  * accelerate only enables FSDP for GPU-like distributed types; each worker replaces
    PartialState._prepare_backend with one returning ("gloo", DistributedType.MULTI_GPU) and sets
    ACCELERATE_TORCH_DEVICE=cpu, so the device is cpu, the process group gloo and AcceleratorState turns on
    DistributedType.FSDP.
  * the torchvision shim above.

Outputs (deleted and recreated):
  base/             config.json, model.safetensors, chat_template.jinja, tokenizer.json, tokenizer_config.json,
                    processor_config.json (transformers 5.x writes the image processor, and for Qwen2.5-VL the
                    video processor, as sections of processor_config.json: no preprocessor_config.json or
                    video_preprocessor_config.json)
  run/              the Trainer's output dir: checkpoint-2/, checkpoint-4/ exactly as written
  save_pretrained/<unit>/  config.json + model*.safetensors that model.save_pretrained writes for the
                    unsharded trained model at that checkpoint (rank 0, plain model, inside on_save), to compare
                    converter output with tensor for tensor (generation_config.json dropped)
  reference.pt      {"inputs": {name: tensor}  -- the processor's output for one image+text chat (batch 1),
                               exactly the kwargs the model is called with,
                     "input_ids": LongTensor[2, 12] -- plain text tokens (no image tokens), text-only check,
                     "logits": {"checkpoint-N": fp32 logits of the unsharded model on **inputs},
                     "text_logits": {"checkpoint-N": fp32 logits on input_ids},
                     "steps": {"checkpoint-N": N}}

Checks asserted (main process, after the run, everything read FROM DISK):
  * each checkpoint's weights: pytorch_model_fsdp_0/ (DCP) consolidated with accelerate's merge_fsdp_weights,
    pytorch_model_fsdp.bin with torch.load; loaded strict into a plain model built from base/config.json; the
    logits on inputs and on input_ids match the reference to < 1e-5;
  * save_pretrained/<unit> reloads with from_pretrained, its module state dict equals the checkpoint's exactly,
    and it gives the same logits (< 1e-5);
  * no checkpoint-4 tensor equals its base/ value, except the ones the model never uses (printed; for Llava:
    the CLIP vision tower's post_layernorm, which LlavaModel bypasses by reading hidden_states[-1]);
  * checkpoint-2 and checkpoint-4 logits differ.
"""
import os
import shutil
import socket
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.multiprocessing as mp


_TV_SHIM = []


def tv_shim():
    """Let the CUDA torchvision wheel import on CPU torch: define the op schemas its _meta_registrations needs."""
    if "torchvision" in sys.modules or _TV_SHIM:
        return
    try:
        torch.ops.torchvision.nms  # a working torchvision build already defined it
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_SHIM.append(lib)  # keep the Library object (and so the definitions) alive


tv_shim()

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINERS = os.path.dirname(HERE)
WORLD = 2
VOCAB_TARGET = 128  # BPE vocab incl. special tokens; the model's vocab_size is len(tokenizer) rounded up to odd
MAX_STEPS, SAVE_STEPS, LR, BATCH = 4, 2, 1e-2, 2
N_EXAMPLES = WORLD * BATCH * MAX_STEPS

# name -> (family, state_dict_type)
VARIANTS = {
    "vlm_hf_trainer_qwen2_5_vl": ("qwen2_5_vl", "SHARDED_STATE_DICT"),
    "vlm_hf_trainer_llava": ("llava", "SHARDED_STATE_DICT"),
    "vlm_hf_trainer_gemma3": ("gemma3", "FULL_STATE_DICT"),
}

WORDS = ("red green blue small large cat dog bird tree house river stone cloud light dark image photo picture "
         "shows a the of in on with and is are what where who left right top bottom color shape count one two "
         "three four describe answer question yes no").split()

# family -> special tokens in id order (ids 0..n-1), named roles, the image placeholder, image size
SPECIALS = {
    "qwen2_5_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "gemma3": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"],
}
IMAGE_PX = {"qwen2_5_vl": 32, "llava": 28, "gemma3": 28}

CHAT_TEMPLATES = {
    # the Qwen2.5-VL template's format (without the default system turn)
    "qwen2_5_vl": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # llava-1.5-hf's template format
    "llava": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # gemma-3 template format
    "gemma3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
        "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}
WRAP = {
    "qwen2_5_vl": ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"],
    "llava": ["LlamaDecoderLayer", "CLIPEncoderLayer"],
    "gemma3": ["Gemma3DecoderLayer", "SiglipEncoderLayer"],
}
# tensors the forward pass never reads (they keep their init; real checkpoints of the family carry them too)
UNUSED = {"llava": ("model.vision_tower.post_layernorm.",)}


def model_class(family):
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "llava": transformers.LlavaForConditionalGeneration,
            "gemma3": transformers.Gemma3ForConditionalGeneration}[family]


def build_tokenizer(family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # alphabet = the characters of the corpus only (not all 256 bytes): keeps the vocab (and the fixture) small
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=specials, show_progress=False)
    corpus = [" ".join(WORDS), *WORDS, *(" " + w for w in WORDS), *(w + "\n" for w in WORDS),
              "USER: ASSISTANT: user assistant model system\n\n"]
    tok.train_from_iterator(corpus * 4, trainer)
    if family == "qwen2_5_vl":
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                        "vision_bos_token": "<|vision_start|>",
                                        "vision_eos_token": "<|vision_end|>"})
    elif family == "llava":
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                  extra_special_tokens={"image_token": "<image>"})
    else:
        kw = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                  extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                        "image_token": "<image_soft_token>",
                                        "start_of_turn_token": "<start_of_turn>",
                                        "end_of_turn_token": "<end_of_turn>"})
    t = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", model_max_length=512, **kw)
    probe = " ".join(WORDS) + "\nUSER: ASSISTANT: user assistant model\n\n"
    assert t.decode(t(probe, add_special_tokens=False)["input_ids"]) == probe  # nothing outside the alphabet
    for i, s in enumerate(specials):
        assert t.convert_tokens_to_ids(s) == i, (s, t.convert_tokens_to_ids(s))
    return t


def build_processor(family, tokenizer):
    template = CHAT_TEMPLATES[family]
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        px = dict(patch_size=4, temporal_patch_size=2, merge_size=2)
        image = Qwen2VLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, **px)
        video = Qwen2VLVideoProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, min_frames=2,
                                      max_frames=4, **px)
        return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                   chat_template=template)
    if family == "llava":
        from transformers import LlavaImageProcessor, LlavaProcessor

        image = LlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=7,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    image = Gemma3ImageProcessor(size={"height": 28, "width": 28})
    return Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=4, chat_template=template)


def tiny_config(family, tokenizer):
    n = len(tokenizer)
    vocab = n + 1 if n % 2 == 0 else n  # odd: uneven FSDP shards
    ids = tokenizer.convert_tokens_to_ids
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2]},
                             bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                             pad_token_id=ids("<|endoftext|>")),
            # vision hidden 16 (not 32): the merger MLP is (hidden * merge**2)^2, the largest tensor otherwise;
            # one windowed block (fullatt_block_indexes=[]): window_size 16 px = 2x2 merged units per window
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3,
                               patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                               out_hidden_size=32, fullatt_block_indexes=[]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=7, projection_dim=32),
            text_config=LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                    bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")),
            image_token_index=ids("<image>"), projector_hidden_act="gelu", vision_feature_select_strategy="default",
            vision_feature_layer=-1, image_seq_length=16, tie_word_embeddings=False)
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    return Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     query_pre_attn_scalar=16, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"],
                                     max_position_embeddings=512, pad_token_id=ids("<pad>"),
                                     eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>")),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=28, patch_size=7, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)


def build_base(name, family, base_dir):
    from transformers import AutoConfig, AutoProcessor

    shutil.rmtree(base_dir, ignore_errors=True)
    tokenizer = build_tokenizer(family)
    processor = build_processor(family, tokenizer)
    cfg = tiny_config(family, tokenizer)
    torch.manual_seed(list(VARIANTS).index(name))
    model = model_class(family)._from_config(cfg, dtype=torch.float32)
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(base_dir, f)):
            os.remove(os.path.join(base_dir, f))
    AutoConfig.from_pretrained(base_dir)
    p = AutoProcessor.from_pretrained(base_dir)
    assert type(p).__name__ == type(processor).__name__, type(p)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"{name}: base/ {sorted(os.listdir(base_dir))}, {n} parameters, vocab {cfg.get_text_config().vocab_size}")


def random_image(g, px):
    from PIL import Image

    return Image.fromarray(torch.randint(0, 256, (px, px, 3), generator=g, dtype=torch.uint8).numpy())


def random_words(g, k):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())


def chat(q, a):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
    if a is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": a}]}]


def encode(processor, family, image, messages, pad_to=None, add_generation_prompt=False):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    kw = dict(padding="max_length", max_length=pad_to) if pad_to else {}
    out = processor(text=[text], images=[image], return_tensors="pt", **kw)
    out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if pad_to:
        assert out["input_ids"].shape[1] == pad_to, (out["input_ids"].shape, pad_to, text)
    return out


def make_examples(processor, family, cfg):
    g = torch.Generator().manual_seed(1234)
    image_id = cfg.image_token_id if family == "qwen2_5_vl" else cfg.image_token_index
    pad_id = processor.tokenizer.pad_token_id
    drawn = [(random_image(g, IMAGE_PX[family]), chat(random_words(g, 3), random_words(g, 3)))
             for _ in range(N_EXAMPLES)]
    pad_to = max(encode(processor, family, img, msgs)["input_ids"].shape[1] for img, msgs in drawn)
    examples = []
    for img, msgs in drawn:
        ex = encode(processor, family, img, msgs, pad_to=pad_to)
        labels = ex["input_ids"].clone()
        labels[(labels == pad_id) | (labels == image_id)] = -100
        ex["labels"] = labels
        examples.append(ex)
    return examples


def reference_inputs(base_dir, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(4321)
    img = random_image(g, IMAGE_PX[family])
    inputs = encode(processor, family, img, chat("what color is the cat", None), add_generation_prompt=True)
    words = processor.tokenizer(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    assert len(words) >= 24
    text_ids = torch.tensor(words[:24]).reshape(2, 12)
    return inputs, text_ids


def collate(examples):
    return {k: torch.cat([ex[k] for ex in examples], dim=0) for k in examples[0]}


def patch_accelerate_for_cpu_fsdp():
    import accelerate.state as st
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    st.PartialState._prepare_backend = _prepare_backend


def logits_of(model, inputs, text_ids):
    with torch.no_grad():
        a = model(**inputs).logits.float().clone()
        b = model(input_ids=text_ids).logits.float().clone()
    return a, b


def worker(rank, name, folder, ref_tmp, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    patch_accelerate_for_cpu_fsdp()
    family, sdt = VARIANTS[name]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoProcessor, Trainer, TrainerCallback, TrainingArguments

    base_dir, run_dir = os.path.join(folder, "base"), os.path.join(folder, "run")
    sp_dir = os.path.join(folder, "save_pretrained")
    cfg = AutoConfig.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    cls = model_class(family)
    model = cls.from_pretrained(base_dir, dtype=torch.float32)
    examples = make_examples(processor, family, cfg)
    inputs, text_ids = reference_inputs(base_dir, family)
    refs, text_refs, steps, info = {}, {}, {}, {}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    class RefLogits(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            if torch.distributed.get_rank() == 0:
                key = f"checkpoint-{state.global_step}"
                plain = cls._from_config(cfg, dtype=torch.float32).eval()
                plain.load_state_dict({k: v.detach().float().cpu() for k, v in sd.items()}, strict=True)
                refs[key], text_refs[key] = logits_of(plain, inputs, text_ids)
                steps[key] = state.global_step
                out = os.path.join(sp_dir, key)
                plain.save_pretrained(out)
                for f in os.listdir(out):
                    if not (f.endswith(".safetensors") or f == "config.json" or f.endswith(".safetensors.index.json")):
                        os.remove(os.path.join(out, f))
                info.setdefault("gathered_keys", sorted(sd))
            torch.distributed.barrier()

    fsdp_config = {"version": 2, "state_dict_type": sdt, "transformer_layer_cls_to_wrap": WRAP[family]}
    args = TrainingArguments(output_dir=run_dir, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, learning_rate=LR,
                             per_device_train_batch_size=BATCH, fsdp=True, fsdp_config=fsdp_config,
                             report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=DS(), processing_class=processor,
                      data_collator=collate, callbacks=[RefLogits()])
    trainer.train()
    info["distributed_type"] = str(trainer.accelerator.distributed_type)
    info["wrapped"] = type(trainer.model_wrapped).__module__ + "." + type(trainer.model_wrapped).__name__
    info["is_fsdp2"] = trainer.accelerator.is_fsdp2
    if rank == 0:
        torch.save({"logits": refs, "text_logits": text_refs, "steps": steps, "info": info}, ref_tmp)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_checkpoint_weights(ckpt, scratch):
    """Model weights of one saved checkpoint, read from disk with the frameworks' own tools."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    found = {}
    dcp = os.path.join(ckpt, "pytorch_model_fsdp_0")
    if os.path.isdir(dcp):
        out = os.path.join(scratch, os.path.basename(ckpt))
        merge_fsdp_weights(dcp, out, safe_serialization=True)
        found["pytorch_model_fsdp_0 (DCP, merge_fsdp_weights)"] = load_file(os.path.join(out, "model.safetensors"))
    full = os.path.join(ckpt, "pytorch_model_fsdp.bin")
    if os.path.isfile(full):
        found["pytorch_model_fsdp.bin"] = torch.load(full, weights_only=True)
    return found


def check(name, folder, ref):
    from transformers import AutoConfig

    family = VARIANTS[name][0]
    cls = model_class(family)
    base_dir = os.path.join(folder, "base")
    cfg = AutoConfig.from_pretrained(base_dir)
    inputs, text_ids = ref["inputs"], ref["input_ids"]
    # base/ and save_pretrained/ files use the legacy on-disk names, the checkpoints the module names: compare
    # module state dicts (from_pretrained maps the names back)
    base_sd = cls.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    scratch = tempfile.mkdtemp(prefix=f"{name}_verify_")
    try:
        for key in ref["logits"]:
            weights = load_checkpoint_weights(os.path.join(folder, "run", key), scratch)
            assert weights, f"no model weights found in {key}"
            for what, sd in weights.items():
                plain = cls._from_config(cfg, dtype=torch.float32).eval()
                plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
                a, b = logits_of(plain, inputs, text_ids)
                da = (a - ref["logits"][key]).abs().max().item()
                db = (b - ref["text_logits"][key]).abs().max().item()
                print(f"  {name} {key} {what}: {len(sd)} tensors, max|logits - ref| = {da:.2e}, text {db:.2e}")
                assert da < 1e-5 and db < 1e-5, (name, key, what, da, db)
                if key == f"checkpoint-{MAX_STEPS}":
                    pstate = plain.state_dict()
                    assert pstate.keys() == base_sd.keys()
                    same = [k for k, v in pstate.items() if torch.equal(v, base_sd[k])]
                    allowed = UNUSED.get(family, ())
                    bad = [k for k in same if not k.startswith(allowed)]
                    print(f"  {name} {key}: tensors equal to base/: {same}")
                    assert not bad, bad
            sp = cls.from_pretrained(os.path.join(folder, "save_pretrained", key), dtype=torch.float32).eval()
            ck_sd, sp_sd = plain.state_dict(), sp.state_dict()
            assert ck_sd.keys() == sp_sd.keys() and all(torch.equal(ck_sd[k], sp_sd[k]) for k in ck_sd), key
            a, b = logits_of(sp, inputs, text_ids)
            da = max((a - ref["logits"][key]).abs().max().item(), (b - ref["text_logits"][key]).abs().max().item())
            print(f"  {name} save_pretrained/{key}: from_pretrained logits max diff {da:.2e}")
            assert da < 1e-5
        k2, k4 = (f"checkpoint-{s}" for s in (SAVE_STEPS, MAX_STEPS))
        d = (ref["logits"][k2] - ref["logits"][k4]).abs().max().item()
        print(f"  {name} {k2} vs {k4} reference logits differ by {d:.3e}")
        assert d > 1e-3
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(names):
    for name in names:
        t0 = time.time()
        family = VARIANTS[name][0]
        folder = os.path.join(TRAINERS, name)
        os.makedirs(folder, exist_ok=True)
        for sub in ("run", "save_pretrained"):
            shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
        ref_path = os.path.join(folder, "reference.pt")
        if os.path.exists(ref_path):
            os.remove(ref_path)
        build_base(name, family, os.path.join(folder, "base"))
        fd, ref_tmp = tempfile.mkstemp(suffix=".pt")
        os.close(fd)
        try:
            mp.spawn(worker, args=(name, folder, ref_tmp, free_port()), nprocs=WORLD)
            ref = torch.load(ref_tmp, weights_only=True)
        finally:
            os.remove(ref_tmp)
        print(f"{name}: {ref['info']['distributed_type']} {ref['info']['wrapped']} fsdp2={ref['info']['is_fsdp2']}")
        assert ref["info"]["distributed_type"] == "DistributedType.FSDP", ref["info"]
        assert ref["info"]["is_fsdp2"], ref["info"]
        inputs, text_ids = reference_inputs(os.path.join(folder, "base"), family)
        out = {"inputs": inputs, "input_ids": text_ids, "logits": ref["logits"], "text_logits": ref["text_logits"],
               "steps": ref["steps"]}
        check(name, folder, out)
        torch.save(out, ref_path)
        print(f"{name}: wrote {ref_path} steps={ref['steps']} inputs="
              f"{ {k: (tuple(v.shape), str(v.dtype)) for k, v in inputs.items()} } in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    # Run through a sibling folder's link, the folder names the variant; run here, no argument means all three.
    linked = os.path.basename(HERE) != os.path.basename(os.path.dirname(os.path.realpath(__file__)))
    chosen = sys.argv[1:] or ([os.path.basename(HERE)] if linked else list(VARIANTS))
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    main(chosen)
