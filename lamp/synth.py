"""Synthetic LaMP data with a planted personalization signal.

The generative model
--------------------
There are twelve topics (space, ocean, crime, ...), each with its own words.
Every synthetic user has latent traits, drawn once from (seed, task, user):

- three favourite topics with Dirichlet weights; each profile item and the
  user's one question are on one of them (one item in ten on any topic);
- LaMP_1: the topics of the author's own papers are those favourites. The
  question's correct reference is a paper on one of the author's topics, the
  distractor on a topic the author never wrote about. Only three times in ten
  does the correct reference share the new paper's topic, so the title alone
  gets about 65 %; the profile tells the author's topics apart.
- LaMP_2: a tag preference per topic. A movie's tag is the user's tag for its
  topic (70 %) or the tag a cue word in the description suggests (30 %). The
  cue is visible to any model; the preference only in the tags of the user's
  own items on the same topic.
- LaMP_3: a rating bias (a base score in 1..5) and a shift per topic. A score is
  base + topic shift + the review's sentiment (-1, 0, +1, which the review's
  words show), clipped to 1..5. Only the profile's scores reveal the bias.
- LaMP_4 and LaMP_5: title vocabulary. A title is the user's habitual word,
  then two signature words the user uses for that topic, around the article's
  two key words. The key words are in the input; the habits only in the
  titles of the user's items, sharpest on the same topic.
- LaMP_7: phrasing habits. The task input is a neutral sentence; the user's
  tweet opens with their interjection, makes their word substitutions ("you"
  -> "u", ...) and ends with the hashtag they use for the topic.

So the signal sits mostly in the output halves of profile items and is sharper
in items on the query's topic; items of other users follow other traits and
carry no information about this user beyond what the input already shows.

Layout: LaMP_k/<split>/<split>_questions.json and <split>_outputs.json, JSON
arrays exactly as the official download. One question per user, as in LaMP's
user-based split; users are split 4:1 between train and dev (user-disjoint).
The time-based layout (`setting="time"`, under time/LaMP_k/...) holds the same
users, questions and items, each item dated and each question dated after all
of its user's items, as LaMP's time-based split asks about a user's newest
item. The dates come from a random stream of their own, so the user-based
data is the same whether or not the time-based one is written.
Files are streamed to disk user by user, so `--users 100000` needs little
memory, and written atomically. `--test-users N` adds a test split of N more
users: its questions in test/test_questions.json, its golds in
test/test_golds.json, a name the loader does not read (LaMP's test golds are
hidden; these let a test score test predictions with `evaluate`).

`write_like_lamp` (`synth --like-lamp [--scale F]`) writes each task at LaMP's
own sizes instead: its user-based train and dev question counts (times F), its
mean profile size, with sizes skewed like real profiles, and texts of about its
mean input and output lengths. The planted signal is the same.
"""

import datetime
import json
import math
import os
import string
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lamp.data import SETTINGS
from lamp.errors import LampError
from lamp.seeding import example_rng
from lamp.tasks import LAMP_2_TAGS, LAMP_PROFILE_SIZE, get_task

TOPIC_WORDS = {
    "space": "planet orbit rocket galaxy astronaut comet starship nebula asteroid lunar "
             "cosmos satellite telescope gravity alien meteor launchpad mars eclipse spacewalk",
    "ocean": "ocean island sailor harbor reef whale storm ship tide pirate coral shore anchor "
             "lighthouse diver wave lagoon current fisherman sea",
    "crime": "detective murder heist gangster police robbery suspect witness courtroom smuggler "
             "prison alibi thief mafia clue verdict fraud hostage cartel informant",
    "family": "mother father daughter wedding sibling grandmother childhood household reunion "
              "divorce inheritance cousin parenting nursery marriage adoption twins toddler "
              "neighbor babysitter",
    "war": "soldier battle army general trench invasion regiment sniper bombing frontline "
           "veteran siege rebellion commander artillery empire colonel occupation resistance treaty",
    "sports": "football coach stadium championship athlete tournament league pitcher goalkeeper "
              "marathon referee rookie playoff boxer trophy sprint racing hockey season scoreboard",
    "music": "guitar band concert singer album melody orchestra drummer rhythm jazz chorus "
             "piano studio lyrics tour violin festival composer record ballad",
    "food": "chef restaurant recipe kitchen bakery dessert flavor spice wine menu pasta bread "
            "chocolate harvest cheese feast vegetable oven soup grill",
    "medicine": "doctor hospital surgery patient virus vaccine nurse clinic disease therapy "
                "diagnosis epidemic cancer pharmacy symptom infection cure laboratory genome trauma",
    "politics": "election senator president campaign congress vote parliament governor scandal "
                "policy diplomat minister referendum lobbyist debate reform coalition ballot "
                "cabinet mayor",
    "technology": "robot computer software hacker algorithm internet startup engineer smartphone "
                  "network code data chip cloud browser server device automation digital gadget",
    "nature": "forest mountain river wildlife valley desert jungle tiger glacier volcano meadow "
              "eagle wolf canyon rainforest bear prairie waterfall hiking lake",
}
TOPICS = list(TOPIC_WORDS)
TOPIC_VOCAB = [np.array(words.split()) for words in TOPIC_WORDS.values()]

FILLER = np.array((
    "the a of and in with for to on about their his her new old young after before when "
    "while story life world people time day way year man woman group city town small great "
    "last first long hard secret strange local dark bright journey together against finally "
    "everything nothing between under through around begins finds learns must tries faces"
).split())

# LaMP_2: a word in the description that suggests a tag to every reader.
TAG_CUES = {
    "sci-fi": "futuristic", "based on a book": "novel", "comedy": "hilarious",
    "action": "explosive", "twist ending": "unexpected", "dystopia": "totalitarian",
    "dark comedy": "morbid", "classic": "timeless", "psychology": "obsession",
    "fantasy": "enchanted", "romance": "passionate", "thought-provoking": "philosophical",
    "social commentary": "inequality", "violence": "brutal", "true story": "biographical",
}
# LaMP_3: the review's sentiment (-1, 0, +1) shows in its words.
SENTIMENT_WORDS = {
    -1: "disappointing flimsy broken useless overpriced".split(),
    0: "okay decent average adequate acceptable".split(),
    1: "excellent sturdy perfect wonderful flawless".split(),
}
HEADLINE_WORDS = (
    "breaking exclusive inside revealed watch update why how analysis opinion explained live "
    "report shocking latest official rare major quiet bold hidden fresh big final real top "
    "urgent crisis deal"
).split()
ACADEMIC_WORDS = (
    "towards learning efficient robust scalable analysis framework approach survey novel "
    "neural adaptive unified generalized theory model study method benchmark estimation "
    "optimal fast deep sparse probabilistic interactive federated causal semantic hierarchical"
).split()
# LaMP_7: the neutral sentences use these words, which users rewrite.
SUBSTITUTIONS = {
    "you": "u", "are": "r", "to": "2", "great": "gr8", "love": "luv", "really": "rly",
    "because": "bc", "tonight": "2nite", "people": "ppl", "please": "pls",
}
TWEET_FILLER = list(SUBSTITUTIONS) + "i my so this just the is it all day".split()
INTERJECTIONS = "omg lol ugh yay tbh ngl smh wow".split()
HASHTAGS = "blessed mood goals fail win vibes tbt facts winning nofilter justsaying weekend".split()

# Profile sizes are LaMP's, scaled down so the demo runs on a laptop.
MEAN_PROFILE_SIZE = {"LaMP_1": 30, "LaMP_2": 40, "LaMP_3": 40, "LaMP_4": 60, "LaMP_5": 40, "LaMP_7": 30}
TASK_NUMBER = {"LaMP_1": 1, "LaMP_2": 2, "LaMP_3": 3, "LaMP_4": 4, "LaMP_5": 5, "LaMP_7": 7}

# ---- LaMP's own sizes, for `write_like_lamp` (`synth --like-lamp`) ----
# Questions per split (train, dev) in LaMP's user-based setting, one per user.
# Meant to be the LaMP paper's data table (Salemi et al. 2023, "LaMP: When Large
# Language Models Meet Personalization", arXiv 2304.11406, dataset statistics).
# The table itself could not be read here; each line says what backs it.
LAMP_QUESTIONS = {
    # UNCONFIRMED: recalled from the paper's table, no source found to check it.
    "LaMP_1": (6542, 1500),
    # Movie tagging (the current LaMP_2, not the first version's news
    # categorization). UNCONFIRMED: recalled, no source found to check it.
    "LaMP_2": (3820, 696),
    # UNCONFIRMED: recalled from the paper's table, no source found to check it.
    "LaMP_3": (20000, 2500),
    # huggingface.co/datasets/MemoryAsModality/LaMP-4 (README dataset_info:
    # train 12527, validation 1925), a copy of LaMP_4 (user-based, as recalled).
    "LaMP_4": (12527, 1925),
    # UNCONFIRMED: recalled from the paper's table, no source found to check it.
    "LaMP_5": (9682, 2500),
    # huggingface.co/datasets/MemoryAsModality/LaMP-7 (train 10437, validation
    # 1500) and github.com/darugareo/persona-steering-cmaes
    # docs/LAMP_PHASE1_COMPLETION_SUMMARY.md (train 10,437, dev 1,500, test 1,496).
    "LaMP_7": (10437, 1500),
}
# Mean words of the task input (instruction and content, as the data set writes
# it) and of the output (generation tasks), from the paper's table of statistics.
# UNCONFIRMED, all of them: recalled and rounded to whole words; no source
# reachable here quotes the table's length columns. Check before relying on them.
LAMP_INPUT_WORDS = {"LaMP_1": 51, "LaMP_2": 92, "LaMP_3": 145, "LaMP_4": 30, "LaMP_5": 153, "LaMP_7": 30}
LAMP_OUTPUT_WORDS = {"LaMP_4": 10, "LaMP_5": 9, "LaMP_7": 17}
# Real profile sizes are right-skewed (a few users have very many items): sizes
# are log-normal around the mean with this sigma (coefficient of variation ~0.8).
PROFILE_SIGMA = 0.7
MIN_SPLIT_USERS = 5  # --scale never leaves a split with fewer questions
TEXT_SIGMA = 0.6  # text_about's log-normal spread of lengths


@dataclass(frozen=True)
class Shape:
    """How big one task's users are: profile size and text lengths (in words).

    `text` is the median length text_about gets for the task's long texts
    (LaMP_1 abstracts, LaMP_2 descriptions, LaMP_3 reviews, LaMP_4 articles,
    LaMP_5 abstracts) and, for LaMP_7, the exact length of the neutral tweet;
    `title` the median for LaMP_1 titles (after their leading word); `title_pad`
    filler words that lengthen LaMP_4/5 titles. The defaults are the demo's."""

    profile_size: int
    skewed: bool = False  # log-normal profile sizes; else uniform on [size/2, 3 size/2]
    text: float = 30
    title: float = 4
    title_pad: int = 0


DEMO_TEXT_WORDS = {"LaMP_1": 30, "LaMP_2": 24, "LaMP_3": 30, "LaMP_4": 36, "LaMP_5": 40, "LaMP_7": 12}
# Words text_about gets on top of its own: the LaMP_2 cue, LaMP_3's two mood
# words, the two key words twice in LaMP_4/5.
EXTRA_WORDS = {"LaMP_2": 1, "LaMP_3": 2, "LaMP_4": 4, "LaMP_5": 4}


def demo_shape(task: str, profile_size: int | None = None) -> Shape:
    return Shape(profile_size or MEAN_PROFILE_SIZE[task], text=DEMO_TEXT_WORDS[task])


def median_for(mean_words: float, extra: int = 0) -> float:
    """The median to give text_about for texts of `mean_words` words on average,
    `extra` words included (its lengths are log-normal, then floored)."""
    return max(1.0, (mean_words - extra + 0.5) / math.exp(TEXT_SIGMA ** 2 / 2))


def content_words(task: str) -> float:
    """Mean words of each content slot for the task input to have LaMP's length."""
    template = get_task(task).input_template
    slots = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    one_word = template.format(*["x"] * slots.count(""), **{name: "x" for name in slots if name})
    return (LAMP_INPUT_WORDS[task] - len(one_word.split())) / len(slots) + 1


def lamp_shape(task: str) -> Shape:
    """LaMP's mean profile size and text lengths for one task."""
    shape = Shape(LAMP_PROFILE_SIZE[task], skewed=True)
    if task == "LaMP_1":
        # A title is a leading word and text_about's; the abstracts get LaMP_5's
        # abstract length (both tasks come from the same citation network data)
        # and, unlike LaMP_5's, have no key words added.
        return replace(shape, title=median_for(content_words(task) - 1), text=median_for(content_words("LaMP_5")))
    if task == "LaMP_7":
        # The input's length; the user's tweet adds an interjection and a hashtag
        # to it, so outputs come out at about 21 words against LaMP's 17.
        return replace(shape, text=round(content_words(task)))
    shape = replace(shape, text=median_for(content_words(task), EXTRA_WORDS[task]))
    if task in ("LaMP_4", "LaMP_5"):
        return replace(shape, title_pad=max(0, LAMP_OUTPUT_WORDS[task] - 5))  # 5: titled_text's own
    return shape


def like_lamp_counts(task: str, scale: float) -> tuple:
    """(train, dev) questions of a task at `scale` times LaMP's."""
    return tuple(max(MIN_SPLIT_USERS, round(n * scale)) for n in LAMP_QUESTIONS[task])


def pick(rng, words):
    return words[rng.integers(len(words))]


def text_about(rng, topic: int, mean_words: int, extra=()) -> str:
    """Topic words and filler in random order, with `extra` words mixed in.
    Lengths are log-normal around the mean, skewed like real LaMP texts."""
    n_words = max(4, int(rng.lognormal(np.log(mean_words), 0.6)))
    n_topic = n_words // 2
    words = np.concatenate([rng.choice(TOPIC_VOCAB[topic], n_topic),
                            rng.choice(FILLER, n_words - n_topic), np.asarray(extra, dtype=str)])
    rng.shuffle(words)
    return " ".join(words.tolist())


def draw_traits(rng, task: str) -> dict:
    """A user's latent traits: favourite topics, and the habits of the task."""
    topics = rng.choice(len(TOPICS), size=3, replace=False)
    traits = {"topics": topics, "weights": rng.dirichlet(np.ones(3))}
    if task == "LaMP_2":
        traits["tag_for_topic"] = rng.integers(len(LAMP_2_TAGS), size=len(TOPICS))
    elif task == "LaMP_3":
        traits["base"] = rng.choice(5, p=[0.1, 0.1, 0.2, 0.3, 0.3]) + 1
        traits["shift"] = rng.choice([-1, 0, 0, 1], size=len(TOPICS))
    elif task in ("LaMP_4", "LaMP_5"):
        vocab = HEADLINE_WORDS if task == "LaMP_4" else ACADEMIC_WORDS
        traits["habit"] = pick(rng, vocab)
        traits["signature"] = [rng.choice(vocab, size=2, replace=False) for _ in TOPICS]
    elif task == "LaMP_7":
        traits["interjection"] = pick(rng, INTERJECTIONS)
        traits["substitutes"] = {w for w in SUBSTITUTIONS if rng.random() < 0.5}
        traits["hashtag"] = rng.choice(HASHTAGS, size=len(TOPICS))
    return traits


def draw_topic(rng, traits) -> int:
    if rng.random() < 0.1:
        return int(rng.integers(len(TOPICS)))
    return int(traits["topics"][rng.choice(3, p=traits["weights"])])


def paper(rng, topic: int, shape: Shape) -> dict:
    """A LaMP_1 paper: an academic-style title and abstract on a topic."""
    title = f"{pick(rng, ACADEMIC_WORDS)} {text_about(rng, topic, shape.title)}"
    return {"title": title, "abstract": text_about(rng, topic, shape.text)}


def titled_text(rng, traits, topic: int, shape: Shape) -> tuple:
    """LaMP_4/5: a text around two key words, and the user's title for it."""
    key = rng.choice(TOPIC_VOCAB[topic], size=2, replace=False)
    text = text_about(rng, topic, shape.text, extra=[*key, *key])
    first, second = traits["signature"][topic]
    title = f"{traits['habit']} {first} {key[0]} {key[1]} {second}"
    if shape.title_pad:
        title += " " + " ".join(rng.choice(FILLER, shape.title_pad).tolist())
    return text, title


def make_item(rng, task: str, traits, topic: int, shape: Shape) -> tuple:
    """One profile item (without id) and the task-input text it would give."""
    if task == "LaMP_1":
        item = paper(rng, topic, shape)
        return item, item["title"]
    if task == "LaMP_2":
        cue = pick(rng, LAMP_2_TAGS)
        tag = cue if rng.random() < 0.3 else LAMP_2_TAGS[traits["tag_for_topic"][topic]]
        description = text_about(rng, topic, shape.text, extra=[TAG_CUES[cue]])
        return {"description": description, "tag": tag}, description
    if task == "LaMP_3":
        sentiment = int(rng.choice([-1, 0, 1], p=[0.2, 0.6, 0.2]))
        score = int(np.clip(traits["base"] + traits["shift"][topic] + sentiment, 1, 5))
        mood = rng.choice(SENTIMENT_WORDS[sentiment], size=2, replace=False)
        text = text_about(rng, topic, shape.text, extra=mood)
        return {"text": text, "score": str(score)}, text
    if task == "LaMP_4":
        text, title = titled_text(rng, traits, topic, shape)
        return {"text": text, "title": title}, text
    if task == "LaMP_5":
        abstract, title = titled_text(rng, traits, topic, shape)
        return {"abstract": abstract, "title": title}, abstract
    neutral = [pick(rng, TWEET_FILLER) if rng.random() < 0.6 else pick(rng, TOPIC_VOCAB[topic])
               for _ in range(int(shape.text))]
    tweet = [SUBSTITUTIONS[w] if w in traits["substitutes"] else w for w in neutral]
    text = f"{traits['interjection']} {' '.join(tweet)} #{traits['hashtag'][topic]}"
    return {"text": text}, " ".join(neutral)


def make_question(rng, task: str, traits, shape: Shape) -> tuple:
    """The user's question: (task input, gold output)."""
    spec = get_task(task)
    topic = draw_topic(rng, traits)
    if task == "LaMP_1":
        own = [int(t) for t in traits["topics"]]
        if rng.random() < 0.3:
            cited_topic = topic
        else:
            cited_topic = pick(rng, [t for t in own if t != topic] or own)
        other = pick(rng, [t for t in range(len(TOPICS)) if t not in own])
        cited, distractor = paper(rng, cited_topic, shape)["title"], paper(rng, other, shape)["title"]
        correct_first = rng.random() < 0.5
        refs = (cited, distractor) if correct_first else (distractor, cited)
        text = spec.input_template.format(title=paper(rng, topic, shape)["title"], ref1=refs[0], ref2=refs[1])
        return text, "[1]" if correct_first else "[2]"
    item, content = make_item(rng, task, traits, topic, shape)
    return spec.input_template.format(content), item[spec.output_half]


def draw_profile_size(rng, shape: Shape) -> int:
    mean = shape.profile_size
    if shape.skewed:  # log-normal with this mean
        return max(1, round(rng.lognormal(math.log(mean) - PROFILE_SIGMA ** 2 / 2, PROFILE_SIGMA)))
    return int(rng.integers(mean // 2, mean * 3 // 2 + 1))


# The time-based layout's dates: items within DATE_SPAN_DAYS of DATE_ORIGIN.
DATE_ORIGIN = datetime.date(2010, 1, 1)
DATE_SPAN_DAYS = 3650
QUESTION_GAP_DAYS = 30  # at most this many days after the user's newest item


def synthetic_dir(out_dir, setting: str) -> Path:
    """Where a setting's layout goes: the user-based one at the top, as the official
    download; the time-based one under time/."""
    return Path(out_dir) if setting == "user" else Path(out_dir) / setting


def with_dates(question: dict, task: str, user: int, seed: int) -> dict:
    """The question of the time-based layout: its items dated (LaMP's YYYY-MM-DD, in
    no particular order, some on the same day) and itself dated after them all."""
    rng = example_rng(seed, f"{task}/user/{user}", "synth dates")
    days = rng.integers(DATE_SPAN_DAYS, size=len(question["profile"])).tolist()
    asked = max(days, default=0) + 1 + int(rng.integers(QUESTION_GAP_DAYS))

    def date(day: int) -> str:
        return (DATE_ORIGIN + datetime.timedelta(days=day)).isoformat()

    profile = [{**item, "date": date(day)} for item, day in zip(question["profile"], days)]
    return {**question, "date": date(asked), "profile": profile}


def make_user(task: str, user: int, seed: int, shape: Shape) -> tuple:
    """One user's question (id, input, profile) and gold output."""
    rng = example_rng(seed, f"{task}/user/{user}", "synth")
    traits = draw_traits(rng, task)
    n_items = draw_profile_size(rng, shape)
    question_id = f"{TASK_NUMBER[task]}{user:07d}"
    profile = []
    for j in range(n_items):
        item, _ = make_item(rng, task, traits, draw_topic(rng, traits), shape)
        profile.append({"id": f"{question_id}{j:04d}", **item})
    text, gold = make_question(rng, task, traits, shape)
    return {"id": question_id, "input": text, "profile": profile}, gold


class JsonArrayWriter:
    """Streams a JSON array (inside an optional wrapper) to a temp file, then renames."""

    def __init__(self, path: Path, head="[", tail="]"):
        self.path, self.tmp, self.tail = path, path.with_name(path.name + ".tmp"), tail
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.file.write(head)
        self.first = True

    def write(self, value) -> None:
        self.file.write(("\n" if self.first else ",\n") + json.dumps(value, ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        self.file.write("\n" + self.tail + "\n")
        self.file.close()
        os.replace(self.tmp, self.path)


TEST_GOLDS = "test_golds.json"  # not `test_outputs.json`: the loader must find the test split without golds


def is_dev_user(user: int) -> bool:
    return user % 5 == 4


def write_task(out_dir: Path, task: str, seed: int, shape: Shape, users: int, is_dev=is_dev_user,
               setting: str = "user", test_users: int = 0) -> None:
    """Users 0 .. users-1 of a task, each into the split `is_dev` says, then
    `test_users` more into test (their golds in TEST_GOLDS), in the setting's layout."""
    writers = {}
    for split in ("train", "dev", "test") if test_users else ("train", "dev"):
        folder = synthetic_dir(out_dir, setting) / task / split
        folder.mkdir(parents=True, exist_ok=True)
        writers[split] = (
            JsonArrayWriter(folder / f"{split}_questions.json"),
            JsonArrayWriter(folder / (TEST_GOLDS if split == "test" else f"{split}_outputs.json"),
                            head=f'{{"task": "{task}", "golds": [', tail="]}"),
        )
    for user in tqdm(range(users + test_users), desc=f"synth {task}", unit="user", leave=False):
        question, gold = make_user(task, user, seed, shape)
        if setting == "time":
            question = with_dates(question, task, user, seed)
        questions, outputs = writers["test" if user >= users else "dev" if is_dev(user) else "train"]
        questions.write(question)
        outputs.write({"id": question["id"], "output": gold})
    # The outputs files are renamed last: a split whose outputs file exists is complete.
    for questions, outputs in writers.values():
        questions.close()
        outputs.close()


def write_synthetic(out_dir, tasks, users: int, seed: int, profile_size: int | None = None,
                    setting: str = "user", test_users: int = 0) -> None:
    """Writes synthetic train and dev files for each task under out_dir, in the
    setting's layout (user: LaMP_k/...; time: time/LaMP_k/..., dated), and a test
    split of `test_users` more users where asked."""
    specs = [get_task(task) for task in tasks]
    check_setting(setting)
    if users < 5:
        raise LampError(f"--users must be at least 5 (one in five users goes to dev), got {users}")
    if profile_size is not None and profile_size < 1:
        raise LampError(f"--profile-size must be at least 1, got {profile_size}")
    if test_users < 0:
        raise LampError(f"--test-users must be 0 or more, got {test_users}")
    for spec in specs:
        write_task(Path(out_dir), spec.name, seed, demo_shape(spec.name, profile_size), users, setting=setting,
                   test_users=test_users)


def write_like_lamp(out_dir, tasks, scale: float = 1.0, seed: int = 0, setting: str = "user") -> dict:
    """Writes each task at LaMP's sizes: its user-based train and dev question
    counts times `scale` (0 < scale <= 1; at least MIN_SPLIT_USERS a split), its
    mean profile size and text lengths, in the setting's layout. Returns {task: (train, dev)}."""
    specs = [get_task(task) for task in tasks]
    check_setting(setting)
    if not 0 < scale <= 1:
        raise LampError(f"--scale must be in (0, 1], got {scale}")
    counts = {}
    for spec in specs:
        train, dev = counts[spec.name] = like_lamp_counts(spec.name, scale)
        # Users 0 .. train-1 are train, the next `dev` dev: user-disjoint.
        write_task(Path(out_dir), spec.name, seed, lamp_shape(spec.name), train + dev,
                   is_dev=lambda user, train=train: user >= train, setting=setting)
    return counts


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise LampError(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
