"""The probe behind the SCOUTER toy recipe of docs/peers.md: the SCOUTER+ head alone (trunk frozen, its
layer4 features of the toy images cached once) trained with AdamW at several lrs and batch sizes;
prints the test accuracy every 2 epochs. Needs the demo's base model.

    python results/probes/scouter_head_lr.py    # from the repository root, about 2 minutes on 2 cores
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from run import config  # noqa: E402
import peers  # noqa: E402
from data.image_data import ImageDataset, normalize  # noqa: E402
from peers import common  # noqa: E402

BASE = 'saved_models/base/toy_resnet18.pth'


def cached_features(trunk, dataset):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([label for _, label in dataset.samples])
    with torch.no_grad():
        return torch.cat([trunk(normalize(chunk)) for chunk in images.split(100)]), labels


def train_head(s, train, test, lr, batch, epochs, lam):
    torch.manual_seed(0)
    head = peers.build_peer('scouter+', s, s['num_classes'])
    head.trunk = torch.nn.Identity()  # the features are cached
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    (x, y), (x_test, y_test) = train, test
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(y))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            logits, attention, _ = head.forward_with_attention(x[idx])
            loss = F.nll_loss(F.log_softmax(logits, 1), y[idx]) + lam * attention.mean() ** s['scouter_power']
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 2 == 1:
            head.eval()
            with torch.no_grad():
                accuracy = (head(x_test).argmax(1) == y_test).float().mean().item()
            print('lr %g batch %d epoch %d: test accuracy %.3f' % (lr, batch, epoch, accuracy), flush=True)


def main():
    s = config.resolve_settings('toy')
    model = peers.build_peer('scouter+', s, s['num_classes'])
    common.start_trunk(model, s, BASE, log=lambda *_: None)
    trunk = model.trunk.eval()
    train = cached_features(trunk, ImageDataset(s['train_dir'], s['img_size']))
    test = cached_features(trunk, ImageDataset(s['test_dir'], s['img_size']))
    lam = s['scouter_lambda']['+']
    for lr, batch, epochs in ((1e-3, 32, 8), (1e-4, 32, 8), (1e-4, 8, 10)):
        train_head(s, train, test, lr, batch, epochs, lam)


if __name__ == '__main__':
    main()
