"""Tiny random Hugging Face captioners and vision-language models, built from configs, saved with
their processors to a directory and loaded back the way users load hub models (``from_pretrained``
on the directory). Shared by the captioning tests and the command-line tests.

Every builder returns the directory; :func:`load` gives ``(model, processor)``. Tokenizers are a
byte-level BPE trained here on scene captions (so words split into sub-words) with the special
tokens every family's processor expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from multiexplain.data.captioned_scenes import make_captioned_scenes

SPECIALS = (
    "<pad>", "<s>", "</s>", "<unk>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
PROMPT_TEXT = "what is in the image? describe the scene. USER: ASSISTANT: Answer: Question: user assistant"
# A minimal chat template in the style of LLaVA's: "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(vocab_size: int = 480, image_token: str | None = "<image>"):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) trained on scene captions and prompt words;
    ``image_token``: the image placeholder the tokenizer declares (``None``: none, the processor adds its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = list(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(make_captioned_scenes(60, seed=9).captions + [PROMPT_TEXT] * 3, trainer)
    extra = {"extra_special_tokens": {"image_token": image_token}} if image_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra)


def bert_tokenizer(directory: Path):
    """A WordPiece tokenizer whose vocabulary splits "triangles" into tri ##angle ##s."""
    from transformers import BertTokenizer

    words = ("[PAD] [UNK] [CLS] [SEP] [MASK] a two three four and red green blue yellow purple white circle square tri "
             "##angle ##s cross ##es ring diamond what is in the image ? describe scene").split()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return BertTokenizer(str(path))


def _lm(cls_name: str, tokenizer, **overrides):
    import transformers

    settings = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    return getattr(transformers, cls_name)(**settings)


def _clip_vision(image_size: int = 32, patch_size: int = 8, **overrides):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**dict(image_size=image_size, patch_size=patch_size, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=64), **overrides})


def _save(directory: Path, model, processor) -> Path:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_ved_swin(directory: Path, seed: int = 0) -> Path:
    """A VisionEncoderDecoder with a Swin encoder (no class token; 2x2 final tokens) and a GPT-2 decoder."""
    from transformers import GPT2Config, SwinConfig, ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    tokenizer = bpe_tokenizer(image_token=None)
    torch.manual_seed(seed)
    encoder = SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 2], window_size=2)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, add_cross_attention=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = VisionEncoderDecoderModel(config=config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_git(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = bert_tokenizer(directory)
    torch.manual_seed(seed)
    config = GitConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # CLIP's processor: shortest edge to 32, then a centre crop (a wide image loses its sides).
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                             tokenizer=tokenizer)
    return _save(directory, GitForCausalLM(config), processor)


def build_blip2(directory: Path, seed: int = 0) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = bpe_tokenizer(image_token=None)
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, max_position_embeddings=64),
        text_config=_lm("OPTConfig", tokenizer, ffn_dim=64, word_embed_proj_dim=32).to_dict(),
        num_query_tokens=4, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4)
    return _save(directory, Blip2ForConditionalGeneration(config), processor)


def build_llava(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=_clip_vision(), text_config=_lm("LlamaConfig", tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(directory, LlavaForConditionalGeneration(config), processor)


def build_fast_vlm(directory: Path, seed: int = 0) -> Path:
    """FastVLM: LLaVA with a convolutional timm tower (timm's tiny test ResNet at output stride 8: a
    4 x 4 feature map of a 32 px image, flattened into 16 image tokens)."""
    from transformers import CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor, TimmWrapperConfig

    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    vision = TimmWrapperConfig(architecture="test_resnet", hidden_size=96, do_pooling=False, model_args={"output_stride": 8})
    config = FastVlmConfig(vision_config=vision, text_config=_lm("Qwen2Config", tokenizer), image_seq_length=16,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE)
    return _save(directory, FastVlmForConditionalGeneration(config), processor)


def build_instructblip(directory: Path, seed: int = 0) -> Path:
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)

    tokenizer, qformer_tokenizer = bpe_tokenizer(image_token=None), bert_tokenizer(directory)
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        qformer_config=dict(vocab_size=len(qformer_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=_lm("LlamaConfig", tokenizer).to_dict(), num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    processor = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=4)
    return _save(directory, InstructBlipForConditionalGeneration(config), processor)


def build_llava_next(directory: Path, seed: int = 0) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=_clip_vision(), text_config=_lm("LlamaConfig", tokenizer), image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(directory, LlavaNextForConditionalGeneration(config), processor)


def build_paligemma(directory: Path, seed: int = 0) -> Path:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    tokenizer = bpe_tokenizer(image_token=None)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image> and the loc/seg tokens
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, projection_dim=32),
        text_config=_lm("GemmaConfig", processor.tokenizer, head_dim=16).to_dict(),
        image_token_index=processor.image_token_id, projection_dim=32, hidden_size=32,
    )
    return _save(directory, PaliGemmaForConditionalGeneration(config), processor)


def build_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers import Qwen2VLVideoProcessor

    tokenizer = bpe_tokenizer(image_token=None)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_lm("Qwen2VLTextConfig", tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4]}).to_dict(),
        **ids,
    )
    # Dynamic resolution: the image keeps its aspect ratio, rounded to multiples of 8 px (patch 4 x merge 2).
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}, patch_size=4, merge_size=2,
                                            temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2),
                                 chat_template=QWEN_TEMPLATE)
    return _save(directory, Qwen2VLForConditionalGeneration(config), processor)


def build_idefics3(directory: Path, seed: int = 0, smolvlm: bool = False) -> Path:
    import transformers

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    tokenizer = bpe_tokenizer()
    # Images are resized to a longest edge of 64 px and split into 32 px tiles plus a global view.
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    extra = {"video_processor": transformers.SmolVLMVideoProcessor()} if smolvlm else {}
    processor = getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                                             chat_template=CHAT_TEMPLATE, **extra)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text_config=_lm("LlamaConfig", processor.tokenizer).to_dict(), scale_factor=2,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _save(directory, getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor)


def build_smolvlm(directory: Path, seed: int = 0) -> Path:
    return build_idefics3(directory, seed, smolvlm=True)


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "ved-swin": build_ved_swin,
    "git": build_git,
    "blip-2": build_blip2,
    "llava": build_llava,
    "fast-vlm": build_fast_vlm,
    "instructblip": build_instructblip,
    "llava-next": build_llava_next,
    "paligemma": build_paligemma,
    "qwen2-vl": build_qwen2_vl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
}


def load(directory: Path):
    """``(model in eval mode, processor)`` from a directory, through the Auto classes (a
    VisionEncoderDecoder: its image processor and tokenizer in one ``(image_processor, tokenizer)``)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers import VisionEncoderDecoderModel

    if AutoConfig.from_pretrained(directory).model_type == "vision-encoder-decoder":
        return (VisionEncoderDecoderModel.from_pretrained(directory).eval(),
                (AutoImageProcessor.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)))
    return AutoModelForImageTextToText.from_pretrained(directory).eval(), AutoProcessor.from_pretrained(directory)
