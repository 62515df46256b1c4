"""Images for training and testing: a Dataset over (path, pid, camid) items and the transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset(Dataset):
    """items: (path, pid, camid) -> (transform(RGB image), pid, camid, index)."""

    def __init__(self, items: Sequence[tuple[str, int, int]], transform: Callable | None = None) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, pid, camid = self.items[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise OSError(f"cannot read image {path} (item {index}): {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, pid, camid, index


def build_transforms(
    height: int,
    width: int,
    is_train: bool,
    random_erasing: float = 0.5,
    flip: float = 0.5,
    pad: int = 10,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> normalised (3, height, width) float tensor.

    Training: resize, horizontal flip (probability `flip`), pad by `pad` and random crop back
    (pad=0 skips both), ToTensor, normalise, RandomErasing (probability `random_erasing`, 0 skips).
    Erased pixels are 0 after normalisation, i.e. the mean colour, as in Zhong et al.'s
    random erasing. Testing: resize, ToTensor, normalise.
    """
    size = (height, width)
    ops: list = [T.Resize(size)]
    if is_train:
        if flip > 0:
            ops.append(T.RandomHorizontalFlip(flip))
        if pad > 0:
            ops += [T.Pad(pad), T.RandomCrop(size)]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if is_train and random_erasing > 0:
        ops.append(T.RandomErasing(p=random_erasing, value=0))
    return T.Compose(ops)
