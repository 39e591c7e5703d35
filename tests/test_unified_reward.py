"""UnifiedReward: the Qwen2.5-VL judge through transformers, its question and the parsing of its answer."""

import io
import math

import pytest
import torch
from PIL import Image

from g2rpo.config import UnifiedRewardModelConfig
from g2rpo.reward_registry import build_reward
from g2rpo.tiny import TINY_JUDGE_ANSWER, random_images, write_unified_reward_folder
from g2rpo.unified_reward import QUESTIONS, load_unified_reward, parse_score

PROMPTS = ["a cat", "a red fox curled up asleep in fresh snow at dawn, soft pastel light", "two penguins"]


def test_parse_score_reads_the_asked_line_only():
    answer = ('Word-wise Scores: [["cat", 1.2], ["[No_mistakes]", 2]]\n\nAlignment Score (1-5): 3.75\n'
              "Coherence Score (1-5): 2\nStyle Score (1-5): 5")
    assert parse_score(answer, "semantic") == 3.75
    assert parse_score("Style Score (1-5): 5\nAlignment Score (1-5):4", "semantic") == 4.0  # its line, not the first
    assert math.isnan(parse_score("Coherence Score (1-5): 2\nStyle Score (1-5): 5", "semantic"))
    assert math.isnan(parse_score("Alignment Score (1-5): 7", "semantic"))  # outside 0-5: no score
    assert parse_score("cat (object): 1\nsnow (location): 0\nFinal Score: 2.33", "score") == 2.33
    assert math.isnan(parse_score(answer, "score"))
    assert "Text Caption: [{prompt}]" in QUESTIONS["semantic"].template  # the caption in brackets, at the end


def test_config_names_a_bad_question_and_quality():
    with pytest.raises(ValueError, match="unifiedreward.question='pairwise': expected one of semantic, score"):
        UnifiedRewardModelConfig(question="pairwise")
    with pytest.raises(ValueError, match="unifiedreward.jpeg_quality=0: expected 1..100 or null"):
        UnifiedRewardModelConfig(jpeg_quality=0)


def test_tiny_judge_answers_through_the_production_loader(tiny_models):
    judge = build_reward("unifiedreward", tiny_models)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert judge.answers(random_images(3, torch.Generator().manual_seed(1)), PROMPTS) == [TINY_JUDGE_ANSWER] * 3
    assert judge.score(images, PROMPTS).tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        judge.score(images, PROMPTS[:2])
    with pytest.raises(FileNotFoundError, match="no config.json in .*nowhere; expected the folder of "
                                                "CodeGoat24/UnifiedReward-qwen-7b"):
        load_unified_reward(tiny_models.unifiedreward.path + "/nowhere")


def _reference_answer(model, processor, image, prompt, question, max_new_tokens):
    """The judge's model card's sequence for one image, as the reference server runs it: the PNG's pixels sent as a
    JPEG of quality 95, one user turn (the image, then the question) under the processor's own chat template and
    image path, greedy decoding."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    received = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    text = QUESTIONS[question].template.replace("{prompt}", prompt)
    messages = [{"role": "user", "content": [{"type": "image", "image": received}, {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("question", ["semantic", "score"])
def test_batched_answers_equal_the_reference_one_image_at_a_time(prompts, tmp_path, question):
    """A random judge (every token depends on the image and the prompt): the batched, left-padded answers equal
    the model card's one-image sequence, image by image; a batch with its images swapped answers differently."""
    write_unified_reward_folder(tmp_path / "judge", prompts, seed=7, steps=0)
    judge = load_unified_reward(tmp_path / "judge", dtype=torch.float32, question=question, max_new_tokens=12)
    images = [Image.new("RGB", (80, 80)), Image.new("RGB", (96, 64), (255, 255, 255)),
              *random_images(1, torch.Generator().manual_seed(2), size=80)]  # unlike enough for a random judge
    answers = judge.answers(images, PROMPTS)
    expected = [_reference_answer(judge.model, judge.processor, image, prompt, question, 12)
                for image, prompt in zip(images, PROMPTS)]
    assert answers == expected and len(set(answers)) == 3
    assert judge.answers(images[::-1], PROMPTS) != answers
    assert torch.isnan(judge.score(torch.rand(1, 3, 64, 64), PROMPTS[:1])).all()  # no score line: NaN, not 0
