"""UnifiedReward (evaluation only): a Qwen2.5-VL judge asked one question per image; its answer parsed to a score.

The protocol is the one of MixGRPO's evaluation harness (``fastvideo/eval/eval_reward.py``), whose table the
G²RPO paper's UnifiedReward column continues; the official G²RPO repository ships no UnifiedReward script.
There the judge (CodeGoat24/UnifiedReward-qwen-7b, a Qwen2.5-VL-7B fine-tune) sits behind an
OpenAI-compatible server and each image is scored on its own:

1. the PNG is sent as a JPEG of quality 95 (`jpeg_roundtrip`);
2. one user message, the image then the *semantic* question with the prompt in it (`QUESTIONS`), under the
   model's own chat template (which adds Qwen's default system message);
3. greedy decoding (temperature 0), at most 4096 new tokens;
4. the score is the number after ``Alignment Score (1-5):`` (`parse_score`); an answer without one is
   not a score and is left out of the mean (the harness counts it).

Here the same model runs in process through transformers (``Qwen2_5_VLForConditionalGeneration`` +
``AutoProcessor`` from a local folder: the judge's weights, chat template and image processor), batched:
left-padded prompts, one ``generate`` per batch (`UnifiedRewardJudge`). GPU only in practice: the 7B judge
in bf16 needs ~16 GB and writes a few hundred tokens per image. The tiny judge of the tests (g2rpo.tiny)
has the same architecture and files; see `g2rpo.tiny.write_unified_reward_folder` for what it can say.
torch and transformers are imported where used, so the config can check a question name without them.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    template: str
    """the text after the image; ``{prompt}`` is replaced by the caption. Data, not code: the judge was
    trained on these words, so they are kept character for character."""
    pattern: str
    """regular expression whose first group is the score in the judge's answer."""


# UnifiedReward-qwen-7b's two image-generation questions (its model card's wording): ``semantic`` is the one the
# reference evaluation asks (unified_reward_default_question_type="semantic"); ``score`` asks for one final score.
QUESTIONS = {
    "semantic": Question(
        "You are presented with a generated image and its associated text caption. Your task is to analyze the "
        "image across multiple dimensions in relation to the caption. Specifically:\n\n"
        "1. Evaluate each word in the caption based on how well it is visually represented in the image. Assign a "
        "numerical score to each word using the format:\n"
        "   Word-wise Scores: [[\"word1\", score1], [\"word2\", score2], ..., [\"wordN\", scoreN], "
        "[\"[No_mistakes]\", scoreM]]\n"
        "   - A higher score indicates that the word is less well represented in the image.\n"
        "   - The special token [No_mistakes] represents whether all elements in the caption were correctly "
        "depicted. A high score suggests no mistakes; a low score suggests missing or incorrect elements.\n\n"
        "2. Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
        "- Alignment Score: How well the image matches the caption in terms of content.\n"
        "- Coherence Score: How logically consistent the image is (absence of visual glitches, object "
        "distortions, etc.).\n"
        "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
        "Output your evaluation using the format below:\n\n"
        "---\n\n"
        "Word-wise Scores: [[\"word1\", score1], ..., [\"[No_mistakes]\", scoreM]]\n\n"
        "Alignment Score (1-5): X\n"
        "Coherence Score (1-5): Y\n"
        "Style Score (1-5): Z\n\n"
        "Your task is provided as follows:\nText Caption: [{prompt}]",
        r"Alignment Score \(1-5\):\s*([0-5](?:\.\d+)?)"),
    "score": Question(
        "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
        "image based on two key criteria:\n"
        "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
        "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
        "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
        "preservation, color accuracy, and overall aesthetic appeal.\n"
        "Extract key elements from the provided text caption, evaluate their presence in the generated image using "
        "the format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and "
        "assign a score from 1 to 5 after 'Final Score:'.\n"
        "Your task is provided as follows:\nText Caption: [{prompt}]",
        r"Final Score:\s*([0-5](?:\.\d+)?)"),
}


def question_text(prompt: str, question: str = "semantic") -> str:
    return QUESTIONS[question].template.replace("{prompt}", prompt)


def parse_score(answer: str, question: str = "semantic") -> float:
    """The judge's score in ``answer`` (the first match of the question's pattern); NaN when it gave none."""
    match = re.search(QUESTIONS[question].pattern, answer)
    return float(match.group(1)) if match else math.nan


def judge_messages(prompt: str, question: str = "semantic") -> list[dict]:
    """The one chat turn the judge is asked: the image, then the question (no system message of our own)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text(prompt, question)}]}]


def jpeg_roundtrip(image, quality: int | None):
    """``image`` as the server receives it: encoded as a JPEG of ``quality`` and decoded (None: unchanged)."""
    from PIL import Image

    if quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class UnifiedRewardJudge:
    """``score(images [B, 3, H, W] in [0, 1], prompts) -> [B]`` (float32, NaN where the answer had no score);
    ``answers(pil_images, prompts)`` gives the judge's texts."""

    def __init__(self, model, processor, device, question: str = "semantic", max_new_tokens: int = 4096,
                 jpeg_quality: int | None = 95, batch_size: int = 8):
        if question not in QUESTIONS:
            raise ValueError(f"unifiedreward.question {question!r}: expected one of {', '.join(QUESTIONS)}")
        self.model, self.processor, self.device = model, processor, device
        self.question, self.max_new_tokens, self.jpeg_quality, self.batch_size = (question, max_new_tokens,
                                                                                  jpeg_quality, batch_size)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token

    def answers(self, images: list, prompts: list[str]) -> list[str]:
        import torch

        texts = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start:start + self.batch_size])
            chats = [self.processor.apply_chat_template(judge_messages(p, self.question), tokenize=False,
                                                        add_generation_prompt=True) for p in batch]
            pixels = [jpeg_roundtrip(image, self.jpeg_quality) for image in images[start:start + len(batch)]]
            inputs = self.processor(text=chats, images=pixels, padding=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
            texts += self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False)
        return texts

    def score(self, images, prompts: list[str]):
        import torch

        from g2rpo.rewards import check_batch, to_pil

        check_batch(images, prompts)
        return torch.tensor([parse_score(a, self.question) for a in self.answers(to_pil(images), prompts)],
                            dtype=torch.float32)


def load_unified_reward(folder: str | Path, device="cpu", dtype=None,
                        question: str = "semantic", max_new_tokens: int = 4096, jpeg_quality: int | None = 95,
                        batch_size: int = 8) -> UnifiedRewardJudge:
    """The judge from a local folder (CodeGoat24/UnifiedReward-qwen-7b's layout), in ``dtype`` (default bf16);
    nothing is downloaded."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"UnifiedReward: no config.json in {folder}; expected the folder of "
                                f"CodeGoat24/UnifiedReward-qwen-7b (scripts/huggingface/download_hf.py)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype or torch.bfloat16,
                                                               local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return UnifiedRewardJudge(model.to(device).eval(), processor, device, question, max_new_tokens, jpeg_quality,
                              batch_size)
