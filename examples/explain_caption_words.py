"""A Grad-CAM++ heat map for every word of a caption.

    python examples/explain_caption_words.py [--out caption_words.png] [--seed 3] [--index 0]

Runs the shipped Show-Attend-Tell captioner on a generated scene: the model writes the caption
(greedy), and every word gets its own map from ONE teacher-forced forward pass. Writes a figure
with the image, one overlay per word (the word as title) and the whole-caption map, and a second
one with Grad-CAM for comparison.

For a Hugging Face captioner loaded by name, the three lines are (no downloads happen here):

    model = BlipForConditionalGeneration.from_pretrained("Salesforce/blip-image-captioning-base")
    processor = AutoProcessor.from_pretrained("Salesforce/blip-image-captioning-base")
    explain_caption(model, Image.open("photo.jpg"), processor=processor).save_figure("words.png")

(``VisionEncoderDecoderModel`` works the same with ``processor=`` its image processor and
``tokenizer=`` its tokenizer, e.g. "nlpconnect/vit-gpt2-image-captioning".)
"""

from __future__ import annotations

import argparse

import torch

from multiexplain.adapters.captioning import explain_caption
from multiexplain.data import make_captioned_scenes
from multiexplain.models import load_show_and_tell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="caption_words.png")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()

    model, vocabulary = load_show_and_tell()
    scene = make_captioned_scenes(1, seed=args.seed, start=args.index)[0]
    # caption=None: the model writes it; both methods come from one teacher-forced forward pass.
    both = explain_caption(model, scene.image, tokenizer=vocabulary, methods=("gradcam++", "gradcam"))
    explanation = both["gradcam++"]

    print(f"true caption:      {scene.caption}")
    print(f"generated caption: {explanation.caption}  (log p = {explanation.caption_score:.3f})")
    for word, score, word_map in zip(explanation.words, explanation.scores, explanation.maps):
        peak = divmod(int(word_map.argmax()), word_map.shape[1])
        print(f"  {word:>10s}  log p = {score:7.3f}  peak at (row, col) = {peak}")
    print("wrote", explanation.save_figure(args.out))
    print("wrote", both["gradcam"].save_figure(args.out.replace(".png", "_gradcam.png")))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
