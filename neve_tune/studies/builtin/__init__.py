"""The built-in studies: model, data, search space and budget of each benchmark.

* :mod:`.digits`: scikit-learn's 8x8 digits, a small CNN, CPU (``digits``, the embedded default);
* :mod:`.cifar`: CIFAR-10 / CIFAR-100 with the CIFAR ResNets (``cifar10``, ``cifar100``);
* :mod:`.imagenet100`: ImageNet-100 from an image folder, ResNet-50 (``imagenet100``).

They are registered by name in :data:`neve_tune.studies.BUILTIN_STUDIES` and imported on first use, so
``digits`` never imports torchvision.
"""
