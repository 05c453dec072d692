import json, sys
d = json.load(open(sys.argv[1]))
ps = d['per_seed']
seeds = sorted(ps['lvw_shared'], key=int)
def v(m, s, k): return ps[m][s][k]
rows = [
 ('classes per word (last layer)', '>= 1.5', lambda s: v('lvw_shared', s, 'classes_per_word'), lambda x: x >= 1.5),
 ('distinct word vectors (of 45)', '>= 40.5 (0.9 P)', lambda s: v('lvw_shared', s, 'distinct_words'), lambda x: x >= 40.5),
 ('top cells on the object', '>= 0.6', lambda s: v('lvw_shared', s, 'top_cells_on_object'), lambda x: x >= 0.6),
 ('... below the base Grad-CAM\'s argmax cell by', '<= 0.1', lambda s: v('base', s, 'top_cells_on_object') - v('lvw_shared', s, 'top_cells_on_object'), lambda x: x <= 0.1),
 ('test accuracy below the base model by', '<= 0.02', lambda s: v('base', s, 'accuracy') - v('lvw_shared', s, 'accuracy'), lambda x: x <= 0.02),
 ('IoU minus faithful LVW\'s (reference flip)', '>= 0', lambda s: v('lvw_shared', s, 'iou_gradcam') - v('lvw_double', s, 'iou_gradcam'), lambda x: x >= 0),
]
print('| target | goal | %s | mean | met |' % ' | '.join('seed %s' % s for s in seeds))
print('|---|---|%s---|---|' % ('---|' * len(seeds)))
for name, goal, f, ok in rows:
    xs = [f(s) for s in seeds]
    m = sum(xs) / len(xs)
    fmt = (lambda x: '%.0f' % x) if 'distinct' in name else (lambda x: '%+.3f' % x if ('by' in name or 'minus' in name) else '%.3f' % x)
    print('| %s | %s | %s | %s | %s |' % (name, goal, ' | '.join(fmt(x) for x in xs), fmt(m),
          '%d of %d seeds' % (sum(ok(x) for x in xs), len(xs))))
