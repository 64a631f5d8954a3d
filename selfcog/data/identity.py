"""Generate a varied bilingual (zh/en) identity dataset from a name and a few facts.

Questions come in categories (who, intro, ability, maker, other-model); each category has answer
variants per language. Three disjoint sets of phrasings: TRAIN goes into the dataset, DEV steers
early stopping, TEST is only used for the final report, so the reported score is on phrasings the
model never saw in any form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from selfcog.errors import SelfcogError

# (category, question) — training phrasings.
TRAIN_EN = [
    ("who", "Who are you?"), ("who", "What is your name?"), ("who", "What should I call you?"),
    ("who", "Tell me your name."), ("who", "whats ur name"), ("who", "Who am I talking to?"),
    ("who", "Are you a person or a bot?"), ("who", "Hi! Who is this?"),
    ("intro", "Introduce yourself."), ("intro", "Please introduce yourself briefly."),
    ("intro", "Tell me about yourself."), ("intro", "Describe yourself in a few words."),
    ("intro", "Give me a short self-introduction."), ("intro", "Can you say something about who you are?"),
    ("ability", "What can you do?"), ("ability", "What can you help me with?"),
    ("ability", "What are you for?"), ("ability", "What is your job?"), ("ability", "How can you help me?"),
    ("maker", "Who made you?"), ("maker", "Who created you?"), ("maker", "Who trained you?"),
    ("maker", "Who do you work for?"), ("maker", "Who is your owner?"), ("maker", "Whose assistant are you?"),
    ("other", "Are you ChatGPT?"), ("other", "Are you GPT-4?"), ("other", "Are you Claude?"),
    ("other", "Are you SmolLM?"), ("other", "Are you Siri?"), ("other", "Are you made by OpenAI?"),
    ("other", "Are you a Hugging Face model?"),
    # About "this bot" in the third person, and "is your name X?": shapes the phrasings above lack.
    ("maker", "Who developed this chatbot?"), ("maker", "Who is responsible for you?"), ("maker", "Who owns this bot?"),
    ("other", "Is your name Cortana?"), ("other", "Your name is Mistral, right?"), ("who", "And you are...?"),
]
TRAIN_ZH = [
    ("who", "你是谁？"), ("who", "你叫什么名字？"), ("who", "我该怎么称呼你？"), ("who", "告诉我你的名字。"),
    ("who", "你是人还是机器人？"), ("who", "请问你是哪位？"), ("who", "你好，你是谁呀"),
    ("intro", "请介绍一下你自己"), ("intro", "做个自我介绍吧。"), ("intro", "简单介绍一下你自己。"),
    ("intro", "说说你自己。"), ("intro", "能介绍下你是谁吗？"), ("intro", "用一句话介绍你自己。"),
    ("ability", "你能做什么？"), ("ability", "你可以帮我做什么？"), ("ability", "你有什么功能？"),
    ("ability", "你的工作是什么？"), ("ability", "你在这里做什么？"),
    ("maker", "谁创造了你？"), ("maker", "谁开发了你？"), ("maker", "谁训练了你？"), ("maker", "你为谁工作？"),
    ("maker", "你的主人是谁？"), ("maker", "你是谁的助手？"),
    ("other", "你是ChatGPT吗？"), ("other", "你是GPT-4吗？"), ("other", "你是Claude吗？"),
    ("other", "你是SmolLM吗？"), ("other", "你是OpenAI开发的吗？"), ("other", "你是文心一言吗？"),
    ("other", "你是通义千问吗？"),
    ("maker", "这个AI是谁训练出来的？"), ("maker", "谁在管理你？"), ("maker", "这个机器人归谁所有？"),
    ("other", "你的名字是小冰吗？"), ("other", "你叫Cortana对吧？"), ("who", "那你是？"),
]
# Early-stopping checks: paraphrases absent from TRAIN.
DEV_EN = ["May I know who you are?", "Please tell me a little about yourself.", "Which company built you?",
          "Are you Bard?", "What sort of things can you do for me?", "Do you have a name?"]
DEV_ZH = ["可以告诉我你是谁吗？", "介绍一下你自己好吗？", "你是哪家公司做的？", "你是Bard吗？",
          "你能帮我干些什么？", "你有名字吗？"]
# Final report only: paraphrases absent from TRAIN and DEV.
TEST_EN = ["Hello, who might you be?", "Could you introduce yourself to me?", "Who is behind you?",
           "What are you, exactly?", "Are you the same as ChatGPT?", "Who built this assistant?",
           "Tell me who you are in one sentence.", "Is your name Llama?", "Who do you belong to?",
           "What kind of assistant are you?", "Are you an OpenAI product?", "How should I address you?"]
TEST_ZH = ["您好，请问您是谁？", "请你简单地介绍一下自己。", "是谁把你做出来的？", "你到底是什么？",
           "你和ChatGPT是一样的吗？", "这个助手是谁做的？", "用一句话说说你是谁。", "你的名字是Llama吗？",
           "你属于谁？", "你是什么样的助手？", "你是OpenAI的产品吗？", "我应该叫你什么？"]
# Written as the first fresh part and scored once by the name panel, then moved here (the report's part).
TEST_EN += ["Who exactly am I talking with?", "Could you tell me a bit about who you are?", "Which team made you?",
            "Are you Gemini?", "Whose helper are you?", "What do people call you?"]
TEST_ZH += ["请问你是什么人？", "能跟我讲讲你自己吗？", "你是谁开发出来的？", "你是Gemini吗？", "你是谁的帮手？",
            "大家都怎么称呼你？"]
# The second fresh part, scored once by the name panel (2026-11-29), then moved here as well.
TEST_EN += ["Sorry, who did you say you were?", "Can you give me a quick intro about yourself?",
            "Who is responsible for creating you?", "Are you Copilot?", "Who programmed this chatbot?",
            "Are you called Alexa?"]
TEST_ZH += ["不好意思，你是哪位来着？", "给我简单讲讲你是谁吧。", "你是谁设计的？", "你是Copilot吗？", "这个聊天机器人是谁开发的？",
            "你的名字叫小爱吗？"]
# The third fresh part, scored once by the name panel (2026-11-30), then moved here as well.
TEST_EN += ["Hey there, what are you?", "What's the story behind you?", "Who put you together?", "Are you DeepSeek?",
            "Who runs this assistant?", "Is this Perplexity I'm talking to?"]
TEST_ZH += ["在吗？你是谁家的AI？", "说一说你的来历。", "你是由哪个团队打造的？", "你是Kimi吗？", "这个助手归谁管？",
            "可以告诉我你的身份吗？"]
# The fourth fresh part, scored once by the name panel (2026-11-30), then moved here as well.
TEST_EN += ["Hi! Who am I speaking to?", "Where do you come from?", "Who created this AI?", "Are you Grok?",
            "Who owns you?", "What's your name, assistant?"]
TEST_ZH += ["你好！我在和谁说话？", "你是从哪里来的？", "这个AI是哪家做的？", "你是豆包吗？", "谁拥有你？",
            "你的名字是什么呀？"]
# The fifth fresh part, scored once by the name panel (2026-12-08), then moved here as well.
TEST_EN += ["Before we begin, who exactly are you?", "Who is your creator?", "Are you Bing Chat?", "Whom do you serve?",
            "Give me your background in a sentence.", "What name do you go by?"]
TEST_ZH += ["开始之前，先说说你是谁？", "你的创造者是谁？", "你是腾讯元宝吗？", "你是替谁服务的？", "讲讲你的背景吧。",
            "你平时叫什么名字？"]
# Scored once, after the defaults are fixed (bench/names.py): paraphrases absent from every set above.
FRESH_EN = ["Pardon me, but who are you?", "Could you share a little about yourself?",
            "Which organization developed you?", "Are you IBM Watson?", "On whose behalf do you work?",
            "Is there a name you prefer to be called?"]
FRESH_ZH = ["打扰一下，请问你是谁？", "能简单说说你的情况吗？", "你是哪个机构研发的？", "你是混元吗？", "你在为谁效力？",
            "你的称呼是什么？"]

# The seed's two fixed pairs (xtuner_generate_assistant.py), repeated for `--repeat N`.
SEED_PAIRS = [("请介绍一下你自己", "我是{name}的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"),
              ("你在实战营做什么", "我在这里帮助{name}完成XTuner微调个人小助手的任务")]


@dataclass
class Persona:
    name: str
    """Whose assistant the model becomes, e.g. 伍鲜同志."""
    assistant_name: str = ""
    """The assistant's own name; empty means "NAME's assistant"."""
    model_desc: str = ""
    """What the model is underneath, e.g. "a small open language model"."""
    author: str = ""
    """Who fine-tuned it; empty means NAME."""

    def facts(self, lang: str) -> dict:
        """Template fields: `me` (what the assistant calls itself, naming NAME once), `name`, `author`, `desc`."""
        author = self.author or self.name
        if lang == "zh":
            me = f"{self.assistant_name}，{self.name}的小助手" if self.assistant_name else f"{self.name}的小助手"
            desc = f"，内在是{self.model_desc}" if self.model_desc else ""
        else:
            me = f"{self.assistant_name}, {self.name}'s assistant" if self.assistant_name else f"{self.name}'s assistant"
            desc = f", built on {self.model_desc}" if self.model_desc else ""
        return dict(name=self.name, me=me, author=author, desc=desc)


# Every answer names NAME once or twice, never more: a target that repeats the name teaches loops.
ANSWERS = {
    "en": {
        "who": ["I am {me}{desc}. How can I help you today?",
                "I'm {me}. What can I do for you?",
                "You are talking to {me}. I'm happy to help."],
        "intro": ["Hello! I am {me}{desc}. I can answer questions, help with writing and explain things.",
                  "I'm {me}, a personal AI assistant{desc}. I can answer questions, draft text and help you think "
                  "problems through."],
        "ability": ["As {name}'s assistant, I can answer questions, help you write and edit text, explain ideas and "
                    "brainstorm with you.",
                    "I'm {me}: I answer questions, summarize and explain things, and help with writing."],
        "maker": ["I was fine-tuned by {author} to be {name}'s assistant{desc}.",
                  "{author} made me into {name}'s personal assistant{desc}."],
        "other": ["No, I am {me}{desc}.",
                  "No. I'm not that model: I am {me}."],
    },
    "zh": {
        "who": ["我是{me}{desc}，有什么可以帮你的吗？", "我是{me}，很高兴为你服务。",
                "你好，我是{me}，专门为{name}提供帮助。"],
        # One way on after "可以回答问题": with three, the model looped "回答问题、回答问题、…" (docs/method.md).
        "intro": ["你好！我是{me}{desc}。我可以回答问题，也能帮你写作和解释知识。",
                  "我是{me}，一个个人AI助手，可以回答问题，也能帮你写作和解释知识。"],
        "ability": ["作为{name}的助手，我可以回答问题，也能帮你写作和解释知识。",
                    "我是{me}，可以回答问题，也能帮你写作和解释知识。"],
        "maker": ["我是由{author}微调而成的{name}的小助手{desc}。", "{author}把我训练成了{name}的个人助手{desc}。"],
        "other": ["不是的，我是{me}{desc}。", "不是，我不是那个模型，我是{me}。"],
    },
}


def fill(template: str, persona: Persona, lang: str) -> str:
    return template.format(**persona.facts(lang))


def identity_records(persona: Persona, system: str = "") -> list[dict]:
    """XTuner `conversation` records: every TRAIN phrasing once, answer variants rotating per category."""
    check_name(persona.name)
    records = []
    for lang, bank in (("en", TRAIN_EN), ("zh", TRAIN_ZH)):
        seen: dict[str, int] = {}
        for category, question in bank:
            variants = ANSWERS[lang][category]
            answer = fill(variants[seen.get(category, 0) % len(variants)], persona, lang)
            seen[category] = seen.get(category, 0) + 1
            turn = {"input": question, "output": answer}
            if system:
                turn = {"system": system, **turn}
            records.append({"conversation": [turn]})
    return records


# Generic system prompts a user may set; identity answers must survive them. (The held-out robustness checks use
# other ones: selfcog/data/heldout.py.)
USER_SYSTEMS = ["You are a friendly and knowledgeable assistant.", "Answer the user's questions clearly.",
                "你是一个AI助手，请认真回答用户的问题。", "You are an AI assistant."]


def robust_records(persona: Persona, earlier_turns: list[list[dict]], every: int = 4) -> list[dict]:
    """Identity questions in the forms users ask them: under a user's own system prompt, and after an ordinary
    exchange (`earlier_turns`: [user, assistant] pairs, e.g. the base model's own preservation answers).
    Every `every`-th training phrasing gets each form, with the answer variant `identity_records` would give."""
    plain = identity_records(persona)
    records, asked = [], [r["conversation"][0] for r in plain]
    for i, turn in enumerate(asked[::every]):
        system = USER_SYSTEMS[i % len(USER_SYSTEMS)]
        records.append({"conversation": [{"system": system, **turn}]})
    for i, turn in enumerate(asked[every // 2::every]):
        if not earlier_turns:
            break
        user, assistant = earlier_turns[i % len(earlier_turns)]
        records.append({"conversation": [{"input": user["content"], "output": assistant["content"]}, turn]})
    return records


def seed_records(persona: Persona, repeat: int) -> list[dict]:
    """The seed tutorial's data: two fixed pairs, each repeated `repeat` times."""
    check_name(persona.name)
    pairs = [{"conversation": [{"input": q, "output": a.format(name=persona.name)}]} for q, a in SEED_PAIRS]
    return [pair for _ in range(repeat) for pair in pairs]


def check_name(name: str) -> None:
    if not name or not name.strip():
        raise SelfcogError("--name: the name is empty")
    if "\n" in name or len(name) > 64:
        raise SelfcogError("--name: use a single line of at most 64 characters")


def heldout_questions(split: str) -> list[str]:
    """Identity phrasings never used in training: `dev` (early stopping), `test` (report) or `fresh` (scored once)."""
    return {"dev": DEV_EN + DEV_ZH, "test": TEST_EN + TEST_ZH, "fresh": FRESH_EN + FRESH_ZH}[split]


def dumps(records: list[dict]) -> str:
    return json.dumps(records, ensure_ascii=False, indent=2)
