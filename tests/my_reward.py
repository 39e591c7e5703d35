"""A reward written outside the package and named by import path (``rewards: [{name: tests.my_reward:build}]``),
the example of README "Add a reward": how close each image's mean brightness is to ``target``."""

import torch


class Brightness:
    def __init__(self, target: float, device):
        self.target, self.device = target, device

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -(images.float().mean(dim=(1, 2, 3)) - self.target).abs()


def build(device, target: float = 0.5):
    return Brightness(target, device)


build.name = "brightness"  # its log name: reward/brightness, brightness_reward.txt


def judge(device):
    """An evaluation-only reward (it says so): refused as a training reward, accepted by the evaluation."""
    reward = Brightness(0.5, device)
    reward.trains = False
    return reward


judge.trains = False


def darkness(device):
    """The opposite taste (images near black), an out-of-domain reward that a brightness-hacking run must hurt."""
    return Brightness(0.0, device)


darkness.name = "darkness"
