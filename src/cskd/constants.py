"""Values shared across the code base; defined once so that data, losses and metrics agree."""

#: The one label value that never counts: not in the loss, not in the metric.
IGNORE_INDEX = 255

#: ImageNet statistics the published backbones were trained with (RGB, images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
