"""Settings of an LVW run: plain data, edited per dataset.

Switch dataset by editing the one line `dataset = ...` below, or pass `-dataset NAME` to a script.
Any name can also be changed for one run with `-set NAME=VALUE` (a Python literal), e.g.
`python main.py -set num_train_epochs=21 "push_epochs=[10, 20]"`.

How a run's settings are resolved: the reference values below, then `presets[dataset]`, then the
command line. The resolved settings are saved as settings.json beside the run's checkpoints.
The values at module level are those of the reference code's Oxford-IIIT Pet run.
"""

dataset = 'toy'  # pets | dogs | awa2 | flowers | stl10 | food101 | toy

# ---- model ------------------------------------------------------------------------------------
base_architecture = 'resnet34'      # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
pretrained = True                   # start the backbone from ImageNet weights if a local file has them
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

# ---- schedule ---------------------------------------------------------------------------------
num_train_epochs = 201
num_warm_epochs = 10
push_start = 10
push_interval = 10             # push at every epoch e >= push_start with e % push_interval == 0 ...
push_epochs = None             # ... unless this lists the push epochs explicitly
last_layer_iterations = 20     # last-layer passes after each push
save_threshold = 0.70          # checkpoints are written only above this test accuracy
keep_checkpoints = None        # None keeps every checkpoint; k keeps the k newest plus the best
seed = 0

# ---- attention maps (see README, "Deliberate deviations") -------------------------------------
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
            'finetune_epochs': 5, 'finetune_lr': 1e-3, 'finetune_batch_size': 32},
}
