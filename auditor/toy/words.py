"""A small English caption vocabulary: enough words for tokenizers and caption generators, no data files."""

from __future__ import annotations

ADJECTIVES = (
    "red blue green yellow black white golden silver wooden old new small large tiny huge bright dark "
    "quiet busy ancient modern rustic vintage colorful misty snowy sunny rainy foggy cozy empty crowded "
    "shiny wet dry soft sharp round square tall short happy sleepy wild calm"
).split()
NOUNS = (
    "cat dog horse bird fish car bicycle house castle bridge tree forest mountain river lake ocean beach "
    "city street garden flower table chair lamp book cup bottle boat train plane robot astronaut dragon "
    "knight queen king child woman man girl boy apple banana cake pizza clock window door road field sky "
    "cloud moon sun star tower church market kitchen library portrait painting statue"
).split()
VERBS = (
    "sitting standing running walking sleeping flying swimming riding reading eating jumping dancing "
    "painting holding watching playing resting glowing floating"
).split()
PLACES = (
    "in a park|on a hill|by the sea|in the snow|at night|at sunset|in the rain|on a table|in a kitchen|"
    "in the forest|under a bridge|near a river|in the city|on the moon|in space|in a garden|on a beach"
).split("|")
STYLES = (
    "oil painting|watercolor|photograph|digital art|pencil sketch|studio photo|3d render|illustration|"
    "poster|close up|wide angle|concept art|highly detailed|trending on artstation|4k"
).split("|")
EXTRA_WORDS = "a an the of with and on in at by for from to is are photo picture image".split()


def all_words() -> list[str]:
    words = set(ADJECTIVES + NOUNS + VERBS + EXTRA_WORDS)
    for phrase in PLACES + STYLES:
        words.update(phrase.split())
    return sorted(words)
