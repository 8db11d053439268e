"""Golden outputs of the batched augmentation: sha256 of the bytes every setting produces from a
fixed, seeded batch, recorded from the implementation as it was before it became a list of ops
(BatchTransform at 9a515fd). A change of any pixel, target or random draw shows up here."""

import hashlib

import pytest
import torch

from cnntrain.data import build_data
from cnntrain.data.augment import BatchTransform

CPU = torch.device("cpu")

# each op alone, and together; mixup/cutmix need num_classes, given to all
ALONE = {
    "shift": dict(shift=3),
    "flip": dict(hflip=True),
    "shift_flip": dict(shift=2, hflip=True),
    "rotation": dict(degrees=20),
    "scale": dict(scale=(0.8, 1.2)),
    "affine_flip": dict(shift=2, degrees=10, scale=(0.9, 1.1), hflip=True),
    "rrc": dict(crop_scale=(0.08, 1.0)),
    "rrc_flip_ratio": dict(crop_scale=(0.3, 1.0), crop_ratio=(0.5, 2.0), hflip=True),
    "color_jitter": dict(color_jitter=0.4),
    "hue": dict(hue=0.2),
    "randaugment": dict(policy="randaugment"),
    "autoaugment": dict(policy="autoaugment"),
    "erasing": dict(random_erasing=0.5),
    "mixup": dict(mixup_alpha=0.4),
    "cutmix": dict(cutmix_alpha=1.0),
    "mixup_or_cutmix": dict(mixup_alpha=1.0, cutmix_alpha=1.0),
}
REST = dict(hflip=True, color_jitter=0.4, hue=0.1, random_erasing=0.5)
MIX = dict(mixup_alpha=0.2, cutmix_alpha=1.0)
TOGETHER = {
    "jitter_hue": dict(color_jitter=0.3, hue=0.05),
    "policy_jitter_erasing": dict(policy="randaugment", color_jitter=0.3, random_erasing=0.25),
    "shift_erasing_cutmix": dict(shift=2, random_erasing=0.5, cutmix_alpha=1.0),
    "rrc_randaugment_all": dict(crop_scale=(0.08, 1), policy="randaugment", **REST, **MIX),
    "affine_autoaugment_all": dict(
        shift=3, degrees=10, scale=(0.9, 1.1), policy="autoaugment", **REST, **MIX
    ),
    "shift_autoaugment_all": dict(shift=3, policy="autoaugment", **REST, **MIX),
}
SETTINGS = {**ALONE, **TOGETHER}
# (stored size, model input size): larger images are center-cropped, smaller resized up first
SIZES = {"crop": (28, 24), "upsize": (20, 32)}


@pytest.fixture(autouse=True)
def one_thread():
    """Float reductions (contrast's mean, the resize) are summed the same way on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, str):  # a digest of its own
            h.update(t.encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def batch(b, c, s):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=gen)
    return x, torch.arange(b) % 10


def run(t, x, y, seeds=(0, 1, 7)) -> str:
    """The outputs and targets for several seeds, and a part of the batch (as a rank of two
    transforms its share) for the last."""
    outs = [v for seed in seeds for v in t(x, y, seed)]
    part = slice(len(x) // 2, len(x))
    pos = t.positions(len(x), part)
    outs += t(x[pos], y[pos], seeds[-1], positions=pos, batch=len(x))
    return digest(*outs)


def transform_digest(setting, channels, sizes) -> str:
    stored, size = SIZES[sizes]
    x, y = batch(12, channels, stored)
    mean, std = [0.5, 0.4, 0.3][:channels], [0.2, 0.25, 0.3][:channels]
    t = BatchTransform(mean, std, CPU, size=size, num_classes=10, **SETTINGS[setting])
    return run(t, x, y)


def eval_digest(channels, sizes) -> str:
    stored, size = SIZES[sizes]
    x, y = batch(12, channels, stored)
    t = BatchTransform([0.5] * channels, [0.25] * channels, CPU, size=size)
    return digest(*t(x, y, 3), t.pixels(x))


# the presets (configs/aug/*.yaml) through the config path build_data takes, on each kind of
# data, with the overrides a user may add
PRESETS = {
    "mnist_none": ("mnist", "none", {}, {}),
    "mnist_basic": ("mnist", "basic", {}, {}),
    "mnist_strong": ("mnist", "strong", {}, {}),
    "fashion_none": ("fashion_mnist", "none", {}, {}),
    "fashion_basic": ("fashion_mnist", "basic", {}, {}),
    "fashion_strong": ("fashion_mnist", "strong", {}, {}),
    "cifar_none": ("cifar10", "none", {}, {}),
    "cifar_basic": ("cifar10", "basic", {}, {}),
    "cifar_strong": ("cifar10", "strong", {}, {}),
    "cifar_strong_mix_jitter": (
        "cifar10",
        "strong",
        dict(mixup_alpha=0.2, cutmix_alpha=1.0, color_jitter=0.3, hue=0.05),
        {},
    ),
    "cifar_basic_rrc_upsized": (
        "cifar10",
        "basic",
        dict(natural=dict(shift=0, crop_scale=[0.3, 1.0])),
        dict(image_size=48),
    ),
    "cifar_strong_autoaugment_upsized": (
        "cifar10",
        "strong",
        dict(policy="autoaugment"),
        dict(image_size=40),
    ),
}


def preset_digest(data_root, name) -> str:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    dataset, preset, aug_over, data_over = PRESETS[name]
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={dataset}", f"aug={preset}"])
    aug = OmegaConf.merge(cfg.aug, aug_over)
    rgb = dataset.startswith("cifar")
    data = OmegaConf.merge(
        cfg.data,
        dict(
            root=str(data_root),
            download=False,
            batch_size=16,
            num_workers=0,
            val_split=0.1,
            mean=[0.5] * (3 if rgb else 1),
            std=[0.25] * (3 if rgb else 1),
            **data_over,
        ),
    )
    loaders = build_data(data, aug, device=CPU, seed=5).loaders
    train = loaders["train"]
    x, y = train.images[:12], torch.arange(12) % 10
    train.set_epoch(1)
    first = [v for _, b in zip(range(2), train) for v in b]
    test = loaders["test"].transform
    return digest(run(train.transform, x, y), *first, *test(x, y, 0))


GOLDEN_TRANSFORMS = {  # setting/channels/sizes: sha256 of the augmented batch
    "affine_autoaugment_all/1/crop": "f477d17556fe84e3f238dc6be4670bd3b296e3f844460e0f0e357d04e6b1978d",
    "affine_autoaugment_all/1/upsize": "df12d45485bc7720f69254c6c6d48ad560d9cf6565938d33153a50415c4995c0",
    "affine_autoaugment_all/3/crop": "70f2d45bb427a90e7de8a2b4a3e47441562f744fecd50af7491a9532ed262715",
    "affine_autoaugment_all/3/upsize": "9d026714a5494304a295141a3b0de531097dea5a6cf6f4c2eb081329a06d57b5",
    "affine_flip/1/crop": "c6815f1c1a32c0239f2a211a70f56cbcde0d6cc9b511d46c1464bb97f311e934",
    "affine_flip/1/upsize": "20097839d4cc5b1f3f8d8c261f037dbb4f5577a52444a5761cb875bb9f033848",
    "affine_flip/3/crop": "535e07ce9069a7ba369d59f5f9c9a686bb2d6465ba8ce10522170cf5f362aeac",
    "affine_flip/3/upsize": "6107a95c297a8647d1571529b1cee8a7fd91d24aea6c90ff03afa48d567caf65",
    "autoaugment/1/crop": "073228f12bc33e1689aa6abee19d18f2ffd34494fc0e9e985aab01462bdf668e",
    "autoaugment/1/upsize": "5600dea9150d466fd5782e12d32532ee50a8e669920a38151421d95ddf454922",
    "autoaugment/3/crop": "fa615e0fd2e14b5076ed31788889276a35cb02b2bc9825417c7f341e9cd0adf8",
    "autoaugment/3/upsize": "50a16daeacc3221395d2b8418f732044dabf30a65a9241f8ef097bb8da7924f3",
    "color_jitter/1/crop": "e216205eb59dd7b7d9ec1c5644b44063c8f696760dee97798375d790fb4eb77d",
    "color_jitter/1/upsize": "7e93ddee25d25e281aababb547d747591dec760f2b69143947c10adf1d00799d",
    "color_jitter/3/crop": "202a6a6bc279fc4d432034ac45058ebbbc46de59638eb7cc74d0e3029d0a5e00",
    "color_jitter/3/upsize": "c6d68acc2981d5bdbfb9145b446e1eef23574ecdd0794319c6f37c1084136941",
    "cutmix/1/crop": "db6f62e1e8bafa569bb60ada1c3b0c08ed52d0f784a9af747f3e0fdae4fb2aec",
    "cutmix/1/upsize": "dab7db14f6a22fafd7ff08b87fc453f69a655824b68755500d3f53fddd23d07a",
    "cutmix/3/crop": "5e2ceaa895765032fc376722c8ac0f1ebd023e4cf4c8db9f36748884be3651c9",
    "cutmix/3/upsize": "de17e60a0d153e89d7296a617600be29bf6154539b225497a36a1070fcb58220",
    "erasing/1/crop": "219bb1b54a778fabea2afe6b1becd980934ba613d113dd2c01049f320aaea519",
    "erasing/1/upsize": "e75fe434efe4670acff002112d9f49773e4e9e4ddb0fe52bbabbcce3bc2d65a1",
    "erasing/3/crop": "ed9e09a416fbfd0d1368396d47ada4be7a72c2662583e0b2667b2649971582e7",
    "erasing/3/upsize": "76ac5476f7da769df6858a5fc9cf84b72308930bdd6711bde48a829af7f67c80",
    "flip/1/crop": "deb471e7437715a973d1bf396f7056803139d2bcd4be4ff008cd68b086650bc6",
    "flip/1/upsize": "4a1cbe216e8502e843a1adece1d4b5e18e328fd050669cd723ff738ee205c8e8",
    "flip/3/crop": "feacfbb6fcac9120ba170bc084d141826eb596a9168d3779891aaf2aa00d4713",
    "flip/3/upsize": "edfa9156265e233d77c08627550dae5267d66ed13331bcdaec46f49e1c736ade",
    "hue/1/crop": "6078319b073d024049a0646ecdb0bdfee54b8204a1910fc17f2748d41b4a8a15",
    "hue/1/upsize": "a3ea0527d81dbb663a92a029fe5df9fd0777960ce2eddcde326d135fb2250851",
    "hue/3/crop": "b73694525f435fa3b897fd93a14aa358bc9b196ef39d671dee5410ec8dbb8d67",
    "hue/3/upsize": "9f623014acc20f2679792e70ff88104945a749ebf40625c3f5cb0294f751f7c0",
    "jitter_hue/1/crop": "0cb50823f335120e4a539fe025bf8acebd2bfa287328976c30d7ac979a3933a5",
    "jitter_hue/1/upsize": "49e77b3998e054307040dbd71850a588dc56c75c32fc5026907f8b334f0e0720",
    "jitter_hue/3/crop": "39d9b42cb01c95c3a576c373cee514624f6b09088236f8fc7de9465ca5837966",
    "jitter_hue/3/upsize": "e3403afd55de85373680f3372e48001c97c158eae2b3d50a48ff57842ba39a5d",
    "mixup/1/crop": "14159ea9946f2e1075e6cbb26ca4ef48f314f7be63696f5f62edca75d0125bdb",
    "mixup/1/upsize": "d0453a66f2f7347b08691ca7b143188fe1d3e6a1db55e9d76ef7abab6ecab059",
    "mixup/3/crop": "56303f4090ccd9768167b7afbeb81ce50b69092369851fab484c67aca2ee7ab5",
    "mixup/3/upsize": "25f31cb8be38028b4cf74c4ff11ee7b046b7224ba677f29487842f8ffb002428",
    "mixup_or_cutmix/1/crop": "ba8a7d8f2ceae22c1ae7e013eae2dd20d20b2dd9b208e51ca42a7b3d82c27937",
    "mixup_or_cutmix/1/upsize": "0aa72e89b5c260f4afbcdaae8c6c94d123a0356a0909451480352632dc4da267",
    "mixup_or_cutmix/3/crop": "5d7ac57429abfa5103fa7df6ab192304884d36632dbea896ef65640cf58592cb",
    "mixup_or_cutmix/3/upsize": "87d7a849327297a6fc7ce6bbb3acd9df86ca7099593d52393c2b8c3bb2eef39a",
    "policy_jitter_erasing/1/crop": "8a18e37d3222d1c116c2c23a56a24b1a779927c7f111da3d2d5ac21e9175e5c1",
    "policy_jitter_erasing/1/upsize": "28ed75f69c17c2c63b1a876d32a0537dcce17a3e814bfa485e46b0b3e0708f7a",
    "policy_jitter_erasing/3/crop": "85442d8eb96f12ad0e19d2a8eaafc6907705fcad5edf6290160160fba4f76881",
    "policy_jitter_erasing/3/upsize": "0daa785ddb564a0855639645451bd260a04221d1041c6835ad4f27b9dd0ff449",
    "randaugment/1/crop": "ca40aaeec384cba0db7599662e73c558b9ae357d5d0739f615502fb0521be5fa",
    "randaugment/1/upsize": "b084081e5cc52548042f874afb14884e508b61216cefe581bbdc130095dd6c43",
    "randaugment/3/crop": "3e0efe3dd78a4663490631ced3fc29b11703ca952df75a363e5a7ae39dc683c2",
    "randaugment/3/upsize": "df8d474c134fe857632653b2ce28a87da2ca3084eefd58647397957c40c84098",
    "rotation/1/crop": "97f0c0ed3b59bf175fc8d5394ca72f9474373d073b3ec14d1a442c2e51ccfe86",
    "rotation/1/upsize": "763bda2750c81de921aae726a0d04a35c5b654a2de1c939e8e2ed39638880fef",
    "rotation/3/crop": "5713b7145406ee044ce4375ee2ea215d516c2493feb86bac2ba433ba4fc711d8",
    "rotation/3/upsize": "be33dd9394c93ac357be30224d7387619789373524841671eebd4c4987b5c2da",
    "rrc/1/crop": "937203089ab8d52bacaeb08620571523b9947bccb00656fd52825cce0e37e3ee",
    "rrc/1/upsize": "acc289a673b6ef76df6dc3d84447b646e81e5af7fb9229356588366e63fe0af6",
    "rrc/3/crop": "7e35d1eb24120100238d8c3f74c135f582d14874ca52a7c3508a3785d21315f3",
    "rrc/3/upsize": "c23d132901f7a76f86909f2d46f9c5b65af4395bde5bd3fb06694f873a6dc006",
    "rrc_flip_ratio/1/crop": "16b2fa3c26313ed1bcac5936e9c03a3c4441c33ad36d6e2cba409569a983661c",
    "rrc_flip_ratio/1/upsize": "773afb53957010c9cf9beb45b63a1542aeb33a9b89842d1b39a2007909b6786f",
    "rrc_flip_ratio/3/crop": "3a3d0e39e526ae7da7a8f3f28d7f5a26818bb996eef90ffb72cf1b53928a41f6",
    "rrc_flip_ratio/3/upsize": "63e65f58dcb249408a4f7cdb3f36c21be002732b05a9448849ee4d60f1283874",
    "rrc_randaugment_all/1/crop": "b7b3c15a0b6da391813738a357322cc2f716cbde390520e8a3c6e07e96b6128d",
    "rrc_randaugment_all/1/upsize": "dabc8115cda05b36df208b607acd8f107ec94d7f5b5ef820b75e4fe1885b5bcd",
    "rrc_randaugment_all/3/crop": "d457f5e32a6e4c060f7de5cf29c02ece8fd12f58d25c810128faac14abc1de23",
    "rrc_randaugment_all/3/upsize": "05d66b93905c3eb3b73d48e654579885bae90f68efc195121f53426e34f21b40",
    "scale/1/crop": "68f3d1abdf66e47afc19541d8ec647be3fc1530fa565703f9e924698ba50aa27",
    "scale/1/upsize": "0fda8799795241b229fbd3cc05954eb12d137056d0e2b83d049cd2730e80044b",
    "scale/3/crop": "4800a1e17f169eb22b9628e795b09ab03fb422eecd90424b8b28de1fed7cec43",
    "scale/3/upsize": "045a3715858bd3bfbbf4245832aa607891485ffafe0dea58afebc2cfa907645e",
    "shift/1/crop": "f432d27be7bc5bc62d864a76ccde4e0461677ca23c4d87c03767e195641e2dd7",
    "shift/1/upsize": "e47bd02c81990210016b8f114a492693330deea81306f01453b9b520dba6e8d8",
    "shift/3/crop": "264a41322e03f452cecde862f4937e23726f35df33ee298e94f0e400a0b18abc",
    "shift/3/upsize": "a70456bfb739cf1997d77298f18272ed99e7edc95bef9dc831eb50b0bbdc56c8",
    "shift_autoaugment_all/1/crop": "edb1c4db9c3b32800d02d0b0a0aaffc66c20cc3fb55774a495d50c42d7c8feb4",
    "shift_autoaugment_all/1/upsize": "c7a10907f382e7742304deca3ddc8b3e5892b9ba4427f3e2eafeb48b89309fec",
    "shift_autoaugment_all/3/crop": "0396964ba6b81da22bbfb0e03099886db10ca5c355e8f62754c162299019d71c",
    "shift_autoaugment_all/3/upsize": "89428bfc6b7c8b16bdaf97afdad87eb87f69b25d60e22d5cc9610ac21c5e8149",
    "shift_erasing_cutmix/1/crop": "908a0dab50425d5d130eac477c63d7db30b33ac41d7ed8e1fd73e36741148ca2",
    "shift_erasing_cutmix/1/upsize": "e257d0660149ff7dd9ea4efe907bb74715205a6963fb03a09052aefd6133c474",
    "shift_erasing_cutmix/3/crop": "ef10133daa7a6c32f1833a8920281f8189d01ad744bbd4db0e453adadb2bf879",
    "shift_erasing_cutmix/3/upsize": "9feb4331fc6579cce104a41229802347345f76a7f3d45d999582ea251746af2f",
    "shift_flip/1/crop": "c46a07ade90c1007b0c25951159ea7fb7d250c47da7fcadf963ef0dd582a18a6",
    "shift_flip/1/upsize": "221d4ffc6543fea5c0674ab7d617383cc947ef5e3090622809270717b130fba2",
    "shift_flip/3/crop": "17f415d6c8ab19b1ad815939d86d9e21add52325116697446661fcfbd2b10c66",
    "shift_flip/3/upsize": "5dd7264008d045ec099c4a39f76d512efe6c1a6d36726d806d1eb86d07b3136c",
}
GOLDEN_EVAL = {
    (1, "crop"): "80e1d15917df3c5bbf86a689d7f9089a958e065bcb4edc100133378ba1cf0f2e",
    (1, "upsize"): "aa8ac75b4c81379fc12f096b7fe1c6885d82a3952a4ad3e9bf8412df9d85d803",
    (3, "crop"): "62828b0fea658bb7f49e359299b55db15d55ca93674f97857292c3651e23279f",
    (3, "upsize"): "e8c822c47ee78444c3ec9cda53e69eafdf56b91e5b8473ea4a03465dd0136314",
}
GOLDEN_PRESETS = {
    "cifar_basic": "a63cdba2cdcf6cadf6b2263e7e5c86cf860a72e1afe5f56ba98e9cfaa41c54cf",
    "cifar_basic_rrc_upsized": "9f2f31f11c0baab2bbb49df25d1cc88f80e53729d05a9d963f40cb77fc82d49c",
    "cifar_none": "ef78d309c742071181d4a4dbd1871446338976eef9baebe84fab9603169555c3",
    "cifar_strong": "222fcf7aa4d8dbfac2a6ef2dc9ab59e8e2540f9b45024aeefe60f5bcda1fe4da",
    "cifar_strong_autoaugment_upsized": "40df81b25661661b0b40730ef16030c20d7da4f9323c9b432bf5da3c2f42d6e2",
    "cifar_strong_mix_jitter": "67e37196d7e446526e74265a8a3ce2e869afd0992c58a2dd00c64b19ae076afc",
    "fashion_basic": "bcdee66e11a3f7e254a9e4e69176ba3c16d6cf9325961a08e12e26e5ea54ec5c",
    "fashion_none": "ef67a50f023fc70ddb55fa398e7019f56674e3024c6268545027df71ade10d36",
    "fashion_strong": "c46ad6a3b655f9939a97ff17ab720473707012489d99edff16ddcf4087ec38ff",
    "mnist_basic": "63c9eba7fa3c112d40836ebe81c620df8dbcb443ab8a8c6d57bef56148a2522e",
    "mnist_none": "ef67a50f023fc70ddb55fa398e7019f56674e3024c6268545027df71ade10d36",
    "mnist_strong": "e6054e583406207c83d7e421ed9ec56cc917d181b8cce33d4a7550e8bfc89ef9",
}


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_gives_its_recorded_bytes(setting, channels, sizes):
    assert (
        transform_digest(setting, channels, sizes)
        == GOLDEN_TRANSFORMS[f"{setting}/{channels}/{sizes}"]
    )


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_evaluation_gives_its_recorded_bytes(channels, sizes):
    assert eval_digest(channels, sizes) == GOLDEN_EVAL[channels, sizes]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_gives_its_recorded_bytes(data_root, name):
    assert preset_digest(data_root, name) == GOLDEN_PRESETS[name]
