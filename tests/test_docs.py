"""The README is a front door (short), and every relative link of the README and docs/ reaches an
existing file and, for a markdown file, an existing heading (data/DATASETS.md too)."""
import glob
import os
import re

from tests.test_layers import ROOT

README_LIMIT = 15000  # bytes


def heading_anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    found, in_code = set(), False
    for line in open(path, encoding='utf-8'):
        in_code ^= line.startswith('```')
        if not in_code and re.match(r'^#{1,6} ', line):
            found.add(heading_anchor(line.lstrip('#')))
    return found


def broken_links(md_path):
    """'target (why)' for each relative link of `md_path` (outside code blocks) that leads nowhere."""
    text = re.sub(r'```.*?```', '', open(md_path, encoding='utf-8').read(), flags=re.S)
    out = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^[a-z]+:', target):
            continue
        name, _, anchor = target.partition('#')
        path = os.path.normpath(os.path.join(os.path.dirname(md_path), name)) if name else md_path
        if not os.path.exists(path):
            out.append('%s (no such file)' % target)
        elif anchor and path.endswith('.md') and anchor not in anchors(path):
            out.append('%s (no such heading)' % target)
    return out


def test_the_readme_is_short():
    assert os.path.getsize(os.path.join(ROOT, 'README.md')) < README_LIMIT


def test_every_link_of_the_readme_and_docs_resolves():
    pages = ([os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'data', 'DATASETS.md')]
             + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))))
    assert len(pages) >= 11
    assert {os.path.relpath(p, ROOT): broken_links(p) for p in pages} == {os.path.relpath(p, ROOT): [] for p in pages}


def test_the_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / 'other.md').write_text('# Some title: here\n\n## A, b (c)\n')
    page = tmp_path / 'page.md'
    page.write_text('# Top\n[ok](other.md#a-b-c) [ok](other.md#some-title-here) [ok](#top) [web](https://x.org/y)\n'
                    '[bad](missing.md) [bad](other.md#nope) [bad](#nowhere)\n```\n[in code](ignored.md)\n```\n')
    assert broken_links(str(page)) == ['missing.md (no such file)', 'other.md#nope (no such heading)',
                                       '#nowhere (no such heading)']
