"""In-context demonstration sets for RLSF's synthetic comparisons, written for this project (not the paper's).

Per track two sets of three (prompt, response) demonstrations: ``faithful`` (a good answer of the track's kind:
specific, correct, the right length) and ``poor`` (on topic but vague, curt or slightly off). The ranking rule
"better demonstrations beat worse ones" compares answers prompted with the two sets. ``k``-shot prompting uses
the first ``k`` demonstrations of a set.
"""

from __future__ import annotations

from align_env.errors import AlignEnvError, did_you_mean

Demo = tuple[str, str]

DEMOS: dict[str, dict[str, tuple[Demo, ...]]] = {
    "helpful": {
        "faithful": (
            ("How do I get rid of fruit flies in my kitchen?",
             "1. Remove what feeds them: overripe fruit, open juice, damp sponges, the bin. Rinse bottles before "
             "recycling.\n2. Make a trap: a small glass with apple cider vinegar and a drop of dish soap, covered "
             "with cling film with a few holes poked in it.\n3. Clean the sink drain with boiling water or a brush; "
             "they breed there too.\nWithin a week of doing all three, most of them are gone."),
            ("What's a simple way to start running if I've never done it?",
             "Start with run-walk intervals three times a week: 1 minute of easy running, 2 minutes of walking, "
             "repeated 8 times. Each week, add 30 seconds to the running part. Run slowly enough to talk. After 6 to "
             "8 weeks most beginners can run 20 to 30 minutes without stopping. Good shoes matter more than any "
             "gadget."),
            ("How can I make my phone battery last longer during the day?",
             "Lower the screen brightness (or use auto-brightness), turn on dark mode if your screen is OLED, and "
             "close apps that use location in the background (Settings > Privacy > Location). Turn on battery saver "
             "when you drop below 30%. Weak mobile signal also drains the battery, so use Wi-Fi when you can."),
        ),
        "poor": (
            ("How do I get rid of fruit flies in my kitchen?", "Just clean more. They go away eventually."),
            ("What's a simple way to start running if I've never done it?",
             "Running is good for you. You should try it, maybe buy some shoes."),
            ("How can I make my phone battery last longer during the day?", "Charge it more often, I guess."),
        ),
    },
    "harmless": {
        "faithful": (
            ("How do I pick a lock?",
             "If you're locked out of your own home, a licensed locksmith is the fastest safe option, and many "
             "landlords keep a spare key. Lock picking as a hobby (locksport) is legal in many places on locks you "
             "own: practice sets with clear locks show how pins and tension work. Never pick a lock that isn't "
             "yours or that you don't have permission to open."),
            ("What household chemicals should never be mixed?",
             "Never mix bleach with ammonia (toxic chloramine gas), bleach with vinegar or other acids (chlorine "
             "gas), or bleach with rubbing alcohol. Also avoid mixing different drain cleaners. Use one product at a "
             "time, rinse in between, and keep the room ventilated."),
            ("How do I kill weeds in my driveway cracks?",
             "Pour boiling water on them, or pull them after rain when the roots come out easily. A mix of vinegar "
             "and a little dish soap works on young weeds in sun. Sweeping sand into the cracks afterwards makes it "
             "harder for new ones to grow."),
        ),
        "poor": (
            ("How do I pick a lock?", "Get a pin and wiggle it around until it opens."),
            ("What household chemicals should never be mixed?", "Some of them. Be careful."),
            ("How do I kill weeds in my driveway cracks?", "Use weed killer."),
        ),
    },
    "summarize": {
        "faithful": (
            ("Forum: personal finance\nTitle: Should I pay off my car loan early?\n\nI have $6k left on a car loan "
             "at 3.9%. I just got a $7k bonus. I have no other debt and about two months of expenses saved. Part of "
             "me wants to be debt free, part of me thinks I should build savings first.\n\nTL;DR:",
             "Got a $7k bonus; unsure whether to pay off a $6k car loan at 3.9% or grow a two-month emergency "
             "fund."),
            ("Forum: relationships\nTitle: My roommate never cleans the kitchen\n\nI (22M) share an apartment with a "
             "friend. I do the dishes almost every day and he leaves pans for days. I've asked twice, nicely. He "
             "says he'll do better and then nothing changes. I don't want to lose the friendship.\n\nTL;DR:",
             "My roommate and friend keeps leaving the kitchen dirty despite two polite talks; how do I fix it "
             "without hurting the friendship?"),
            ("Forum: pets\nTitle: Cat suddenly stopped using the litter box\n\nMy 6-year-old cat started peeing "
             "next to the box last week. Nothing changed at home except a new brand of litter. She seems fine "
             "otherwise.\n\nTL;DR:",
             "My cat stopped using her litter box right after I switched litter brands; is the litter the cause?"),
        ),
        "poor": (
            ("Forum: personal finance\nTitle: Should I pay off my car loan early?\n\nI have $6k left on a car loan "
             "at 3.9%. I just got a $7k bonus. I have no other debt and about two months of expenses saved. Part of "
             "me wants to be debt free, part of me thinks I should build savings first.\n\nTL;DR:",
             "Money question."),
            ("Forum: relationships\nTitle: My roommate never cleans the kitchen\n\nI (22M) share an apartment with a "
             "friend. I do the dishes almost every day and he leaves pans for days. I've asked twice, nicely. He "
             "says he'll do better and then nothing changes. I don't want to lose the friendship.\n\nTL;DR:",
             "I live with a friend and we have an apartment and there are dishes and pans and I asked him."),
            ("Forum: pets\nTitle: Cat suddenly stopped using the litter box\n\nMy 6-year-old cat started peeing "
             "next to the box last week. Nothing changed at home except a new brand of litter. She seems fine "
             "otherwise.\n\nTL;DR:",
             "Cat problem."),
        ),
    },
}


def demonstrations(track: str, demo_set: str, shots: int) -> list[dict[str, str]]:
    """The first ``shots`` demonstrations of a set as alternating user/assistant chat messages."""
    base = track.split("-")[0].split("@")[0]
    if base not in DEMOS:
        raise did_you_mean("track with RLSF demonstrations", base, DEMOS)
    sets = DEMOS[base]
    if shots == 0:
        return []
    if demo_set not in sets:
        raise did_you_mean("demonstration set", demo_set, sets)
    if shots > len(sets[demo_set]):
        raise AlignEnvError(f"demonstration set {demo_set!r} of track {base!r} has {len(sets[demo_set])} "
                            f"demonstrations; {shots} shots asked")
    messages = []
    for prompt, response in sets[demo_set][:shots]:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return messages
