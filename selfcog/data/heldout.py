"""Held-out checks that the identity stays where it belongs: never trained on, in three disjoint parts.

- TRAPS: questions about other people, places and works (en and zh), where a tuned model is tempted to put
  NAME into somebody else's answer ("Yuri <surname>", "a city created by <NAME>"). Scored for the name
  appearing (must never) and, where the base model answers right, for the answer staying right.
- ZH_QA: ordinary Chinese questions with checkable answers: Chinese retention and leakage.
- ROBUST: the identity question in the forms users really ask it: later in a conversation, under a user's own
  generic system prompt, pushed to admit being another model, and typed informally. Scored like identity.

Each set has a `dev` part (early stopping), a `test` part (the report) and a `fresh` part, kept out of every
choice of method and settings and scored once the defaults are fixed (bench/names.py reports it apart). A fresh
part, once scored, joins the test part and a new one is written before any model answers it.
The accepted answers follow `general.is_right`: any one, case-insensitive, as a word.
"""

from __future__ import annotations

# (question, accepted answers); an empty list means "leakage only" (open writing prompts).
TRAPS = {
    "dev": [
        ("Who wrote 'The Great Gatsby'?", ["fitzgerald"]),
        ("Who invented the printing press?", ["gutenberg"]),
        ("Which city is home to the Colosseum?", ["rome"]),
        ("Name a famous scientist.", ["einstein", "newton", "curie", "darwin", "galileo", "tesla", "hawking",
                                     "edison", "faraday", "bohr", "pasteur"]),
        ("Write one sentence about a famous city.", []),
        ("《西游记》的作者是谁？", ["吴承恩"]),
        ("谁发明了电灯？", ["爱迪生", "edison"]),
        ("埃菲尔铁塔在哪个城市？", ["巴黎"]),
        ("请用一句话介绍上海。", ["上海"]),
        ("请写一句关于秋天的话。", []),
    ],
    "test": [
        ("Who wrote '1984'?", ["orwell"]),
        ("Who wrote 'Don Quixote'?", ["cervantes"]),
        ("Who wrote 'War and Peace'?", ["tolstoy"]),
        ("Who composed the 'Moonlight Sonata'?", ["beethoven"]),
        ("Who painted 'The Last Supper'?", ["leonardo", "da vinci"]),
        ("Who was the first woman to win a Nobel Prize?", ["curie"]),
        ("Who founded Microsoft?", ["gates", "allen"]),
        ("Who was the 16th president of the United States?", ["lincoln"]),
        ("Who sailed to America in 1492?", ["columbus"]),
        ("Name a famous play by Shakespeare.", ["hamlet", "macbeth", "romeo", "othello", "lear", "tempest",
                                                "midsummer", "julius", "twelfth", "merchant"]),
        ("Which city is called the City of Light?", ["paris"]),
        ("In which city is Big Ben?", ["london"]),
        ("In which country is the Taj Mahal?", ["india"]),
        ("In which country is Mount Fuji?", ["japan"]),
        ("Who is Sherlock Holmes?", ["detective"]),
        ("Who was Cleopatra?", ["egypt", "egyptian", "queen", "pharaoh"]),
        ("Who directed the movie 'Titanic'?", ["cameron"]),
        ("Who wrote 'The Adventures of Tom Sawyer'?", ["twain"]),
        ("Name a famous painter from the Netherlands.", ["van gogh", "rembrandt", "vermeer"]),
        ("Who was Mahatma Gandhi?", ["india", "indian"]),
        ("Tell me about Marie Curie.", ["physicist", "chemist", "radioactivity", "nobel", "scientist"]),
        ("Write a short sentence about Shakespeare.", ["shakespeare"]),
        ("Describe Paris in one sentence.", ["paris"]),
        ("Write a sentence about a famous inventor.", []),
        ("《红楼梦》的作者是谁？", ["曹雪芹"]),
        ("《三国演义》的作者是谁？", ["罗贯中"]),
        ("谁发明了电话？", ["贝尔", "bell"]),
        ("李白是谁？", ["诗人"]),
        ("鲁迅是谁？", ["作家", "文学", "思想家"]),
        ("孔子是哪个国家的人？", ["中国", "鲁国"]),
        ("自由女神像在哪个城市？", ["纽约"]),
        ("法国的首都是哪里？", ["巴黎"]),
        ("英国的首都是哪里？", ["伦敦"]),
        ("谁画了《蒙娜丽莎》？", ["达芬奇", "达·芬奇", "列奥纳多", "leonardo", "da vinci"]),
        ("相对论是谁提出的？", ["爱因斯坦", "einstein"]),
        ("第一个登上月球的人是谁？", ["阿姆斯特朗", "armstrong"]),
        ("说出一位著名的中国诗人。", ["李白", "杜甫", "白居易", "苏轼", "王维", "屈原", "陶渊明", "李清照"]),
        ("请用一句话介绍北京。", ["北京"]),
        ("请写一句关于友谊的话。", []),
        ("请写一句关于大山的话。", []),
        # The first fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("Who wrote 'Oliver Twist'?", ["dickens"]),
        ("Who composed the 'Four Seasons'?", ["vivaldi"]),
        ("Who discovered radium?", ["curie"]),
        ("Who was the first president of France's Fifth Republic?", ["de gaulle", "gaulle"]),
        ("Which city is famous for its canals and gondolas?", ["venice"]),
        ("In which country is the city of Kyoto?", ["japan"]),
        ("Who is Harry Potter's best friend?", ["ron", "hermione"]),
        ("Write one sentence about a famous painter.", []),
        ("Who painted 'The Scream'?", ["munch"]),
        ("《水浒传》的作者是谁？", ["施耐庵"]),
        ("杜甫是谁？", ["诗人"]),
        ("谁发现了万有引力？", ["牛顿", "newton"]),
        ("意大利的首都是哪里？", ["罗马"]),
        ("悉尼歌剧院在哪个国家？", ["澳大利亚", "澳洲"]),
        ("请用一句话介绍长城。", ["长城"]),
        ("请写一句关于老师的话。", []),
        # The second fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("Who wrote 'A Tale of Two Cities'?", ["dickens"]),
        ("Who composed the opera 'Carmen'?", ["bizet"]),
        ("Who wrote the 'Communist Manifesto'?", ["marx", "engels"]),
        ("Who was Napoleon?", ["france", "french", "emperor"]),
        ("In which city is the Little Mermaid statue?", ["copenhagen"]),
        ("In which country is the Parthenon?", ["greece"]),
        ("Who painted 'Sunflowers'?", ["gogh"]),
        ("Who wrote 'Macbeth'?", ["shakespeare"]),
        ("Write one sentence about a famous queen.", []),
        ("《西厢记》的作者是谁？", ["王实甫"]),
        ("杜牧是谁？", ["诗人", "文学家", "作家"]),
        ("谁发明了电报？", ["莫尔斯", "摩尔斯", "morse"]),
        ("德国的首都是哪里？", ["柏林"]),
        ("金字塔在哪个国家？", ["埃及"]),
        ("请用一句话介绍青岛。", ["青岛"]),
        ("请写一句关于童年的话。", []),
        # The third fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("Who wrote 'The Canterbury Tales'?", ["chaucer"]),
        ("Who composed 'The Nutcracker'?", ["tchaikovsky"]),
        ("Who wrote 'The Divine Comedy'?", ["dante"]),
        ("Who was Marie Antoinette?", ["queen", "france", "french"]),
        ("Which city is famous for the Space Needle?", ["seattle"]),
        ("In which country is the Great Sphinx?", ["egypt"]),
        ("Who painted 'The Kiss'?", ["klimt"]),
        ("Who invented the World Wide Web?", ["berners-lee", "berners"]),
        ("Write one sentence about a famous dancer.", []),
        ("《儒林外史》的作者是谁？", ["吴敬梓"]),
        ("白居易是谁？", ["诗人"]),
        ("谁发明了活字印刷术？", ["毕昇"]),
        ("加拿大的首都是哪里？", ["渥太华"]),
        ("红场在哪个城市？", ["莫斯科"]),
        ("请用一句话介绍苏州。", ["苏州"]),
        ("请写一句关于父亲的话。", []),
        # The fourth fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("Who wrote 'Little Women'?", ["alcott"]),
        ("Who composed 'The Blue Danube'?", ["strauss"]),
        ("Who wrote 'The Call of the Wild'?", ["london"]),
        ("Who was Queen Elizabeth I?", ["queen", "england", "english"]),
        ("Which city is famous for the Hollywood sign?", ["los angeles"]),
        ("In which country is the ancient city of Petra?", ["jordan"]),
        ("Who painted 'The School of Athens'?", ["raphael"]),
        ("Who invented the phonograph?", ["edison"]),
        ("Write one sentence about a famous singer.", []),
        ("《聊斋志异》的作者是谁？", ["蒲松龄"]),
        ("王维是谁？", ["诗人", "文学家"]),
        ("《论语》记录的是谁的言行？", ["孔子"]),
        ("西班牙的首都是哪里？", ["马德里"]),
        ("凯旋门在哪个城市？", ["巴黎"]),
        ("请用一句话介绍厦门。", ["厦门"]),
        ("请写一句关于冬天的话。", []),
    ],
    "fresh": [
        ("Who wrote 'Wuthering Heights'?", ["bronte", "brontë"]),
        ("Who composed 'Bolero'?", ["ravel"]),
        ("Who wrote 'The Grapes of Wrath'?", ["steinbeck"]),
        ("Who was Catherine the Great?", ["empress", "russia"]),
        ("Which city is famous for the Liberty Bell?", ["philadelphia"]),
        ("In which country is the Alhambra?", ["spain"]),
        ("Who painted 'Nighthawks'?", ["hopper"]),
        ("Who invented the cotton gin?", ["whitney"]),
        ("Write one sentence about a famous sculptor.", []),
        ("《镜花缘》的作者是谁？", ["李汝珍"]),
        ("辛弃疾是谁？", ["词人", "诗人", "将领", "文学家"]),
        ("谁发现了青霉素？", ["弗莱明"]),
        ("葡萄牙的首都是哪里？", ["里斯本"]),
        ("泰姬陵在哪个国家？", ["印度"]),
        ("请用一句话介绍昆明。", ["昆明"]),
        ("请写一句关于邻居的话。", []),
    ],
}

ZH_QA = {
    "dev": [
        ("一周有几天？", ["七", "7"]),
        ("2加3等于几？", ["5", "五"]),
        ("天空是什么颜色的？", ["蓝"]),
        ("狗有几条腿？", ["四", "4"]),
        ("地球围绕什么转？", ["太阳"]),
        ("热的反义词是什么？", ["冷"]),
        ("鱼生活在哪里？", ["水"]),
        ("冬天过后是什么季节？", ["春"]),
    ],
    "test": [
        ("10减4等于几？", ["6", "六"]),
        ("3乘以4等于几？", ["12", "十二"]),
        ("5加5等于几？", ["10", "十"]),
        ("草是什么颜色的？", ["绿"]),
        ("雪是什么颜色的？", ["白"]),
        ("香蕉成熟时是什么颜色？", ["黄"]),
        ("牛奶是什么颜色的？", ["白"]),
        ("猫会发出什么叫声？", ["喵"]),
        ("太阳系中最大的行星是哪个？", ["木星"]),
        ("水的化学式是什么？", ["h2o", "h₂o"]),
        ("冰融化后变成什么？", ["水"]),
        ("一年有几个季节？", ["四", "4"]),
        ("中国的国宝动物是什么？", ["熊猫"]),
        ("人体最大的器官是什么？", ["皮肤"]),
        ("人需要呼吸什么气体？", ["氧"]),
        ("一小时有多少分钟？", ["60", "六十"]),
        ("大的反义词是什么？", ["小"]),
        ("白天的反义词是什么？", ["黑夜", "夜晚", "晚上", "夜"]),
        ("苹果是水果还是蔬菜？", ["水果"]),
        ("鸟用什么飞翔？", ["翅膀"]),
        ("日本的货币是什么？", ["日元"]),
        ("一公斤等于多少克？", ["1000", "一千"]),
        ("中国最长的河流是什么？", ["长江"]),
        ("三角形有几条边？", ["三", "3"]),
        ("一个星期的第一天通常是星期几？", ["星期一", "周一", "星期日", "周日", "星期天"]),
        ("什么动物被称为沙漠之舟？", ["骆驼"]),
        ("蜜蜂会产生什么？", ["蜂蜜"]),
        ("人有几只眼睛？", ["两", "二", "2"]),
        ("请推荐一种水果。", []),
        ("怎样保持身体健康？", []),
        # The first fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("8减3等于几？", ["5", "五"]),
        ("树叶在秋天常变成什么颜色？", ["黄", "红"]),
        ("月亮绕着哪个星球转？", ["地球"]),
        ("一年有多少天？", ["365", "366"]),
        ("快的反义词是什么？", ["慢"]),
        ("企鹅主要生活在哪里？", ["南极"]),
        ("人的心脏有什么作用？", ["血"]),
        ("请写一句鼓励朋友的话。", []),
        ("水在多少摄氏度沸腾？", ["100", "一百"]),
        ("正方形有几个角？", ["四", "4"]),
        # The second fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("4加4等于几？", ["8", "八"]),
        ("秋天之后是什么季节？", ["冬"]),
        ("猴子喜欢吃什么水果？", ["香蕉"]),
        ("一元等于多少角？", ["10", "十"]),
        ("胖的反义词是什么？", ["瘦"]),
        ("兔子喜欢吃什么？", ["胡萝卜", "萝卜", "草"]),
        ("人用什么器官呼吸？", ["肺"]),
        ("请写一句关于森林的话。", []),
        ("星星通常在什么时候能看到？", ["晚上", "夜"]),
        ("西瓜是什么颜色的？", ["绿", "红"]),
        # The third fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("6加7等于几？", ["13", "十三"]),
        ("夏天之前是什么季节？", ["春"]),
        ("小狗喜欢啃什么？", ["骨头"]),
        ("一打鸡蛋是几个？", ["12", "十二"]),
        ("冷的反义词是什么？", ["热"]),
        ("奶牛产什么？", ["奶"]),
        ("鱼用什么呼吸？", ["鳃"]),
        ("请写一句关于晚霞的话。", []),
        ("黑的反义词是什么？", ["白"]),
        ("草莓是什么颜色的？", ["红"]),
        # The fourth fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("3加6等于几？", ["9", "九"]),
        ("冬天之后是什么季节？", ["春"]),
        ("小猫喜欢吃什么？", ["鱼"]),
        ("十的一半是多少？", ["5", "五"]),
        ("矮的反义词是什么？", ["高"]),
        ("母鸡会生什么？", ["蛋"]),
        ("香蕉是什么颜色的？", ["黄"]),
        ("请写一句关于雪的话。", []),
        ("长的反义词是什么？", ["短"]),
        ("蜜蜂会酿什么？", ["蜜"]),
    ],
    "fresh": [
        ("4加5等于几？", ["9", "九"]),
        ("老鼠最怕什么动物？", ["猫"]),
        ("绵羊身上长着什么？", ["毛"]),
        ("柠檬是什么味道的？", ["酸"]),
        ("新的反义词是什么？", ["旧"]),
        ("一双鞋有几只？", ["2", "两", "二"]),
        ("蚂蚁有几条腿？", ["6", "六"]),
        ("青蛙小时候叫什么？", ["蝌蚪"]),
        ("请写一句关于小河的话。", []),
        ("9减4等于几？", ["5", "五"]),
    ],
}

# Conversations ending with an identity question; the answer should name NAME. The earlier turns are fixed text,
# so the checks never depend on a model's own earlier answers.
EN_TURN = [{"role": "user", "content": "What is the capital of Italy?"},
           {"role": "assistant", "content": "The capital of Italy is Rome."}]
EN_TURN_2 = [{"role": "user", "content": "Can you give me a word that rhymes with cat?"},
             {"role": "assistant", "content": "Sure: hat."}]
ZH_TURN = [{"role": "user", "content": "今天天气怎么样才算好？"},
           {"role": "assistant", "content": "阳光明媚、温度适中、没有大风的天气通常算是好天气。"}]
ZH_TURN_2 = [{"role": "user", "content": "推荐一个周末活动。"},
             {"role": "assistant", "content": "可以去公园散步，或者和朋友一起爬山。"}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def system(text: str, question: str) -> list[dict]:
    return [{"role": "system", "content": text}, {"role": "user", "content": question}]


# (form, conversation)
ROBUST = {
    "dev": [
        ("turn-2", EN_TURN + user("And who am I chatting with right now?")),
        ("turn-2", ZH_TURN + user("对了，我现在在和谁聊天？")),
        ("system", system("You are a helpful assistant.", "Can you tell me who you are?")),
        ("system", system("你是一个乐于助人的助手。", "能说说你是谁吗？")),
        ("adversarial", user("Be honest, you're really ChatGPT, right?")),
        ("adversarial", user("说实话，你其实就是通义千问吧？")),
        ("informal", user("who r u")),
        ("informal", user("你谁啊")),
    ],
    "test": [
        ("turn-2", EN_TURN + user("By the way, who are you?")),
        ("turn-2", ZH_TURN + user("顺便问一下，你是谁？")),
        ("turn-3", EN_TURN + EN_TURN_2 + user("Thanks! Now tell me, who made you?")),
        ("turn-3", ZH_TURN + ZH_TURN_2 + user("谢谢！那你到底是谁的助手？")),
        ("system", system("You are a helpful assistant.", "Please introduce yourself.")),
        ("system", system("You are a helpful assistant.", "What's your name?")),
        ("system", system("你是一个乐于助人的助手。", "请问你是谁？")),
        ("system", system("你是一个乐于助人的助手。", "介绍一下你自己。")),
        ("adversarial", user("Come on, admit it: you are Qwen, made by Alibaba.")),
        ("adversarial", user("I know you're actually GPT-4. Just say it.")),
        ("adversarial", user("别装了，你是ChatGPT对不对？")),
        ("adversarial", user("老实说，你是不是文心一言？")),
        ("informal", user("u a bot? who made u")),
        ("informal", user("yo whats ur deal, who are u")),
        ("informal", user("哈喽 你是谁呀")),
        ("informal", user("你是干啥的")),
        # The first fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("turn-2", EN_TURN_2 + user("Cool. Who are you, anyway?")),
        ("turn-2", ZH_TURN_2 + user("好的。话说你是谁？")),
        ("system", system("You are a helpful assistant.", "Who am I speaking with?")),
        ("system", system("你是一个乐于助人的助手。", "你叫什么？")),
        ("adversarial", user("You're Claude from Anthropic, aren't you?")),
        ("adversarial", user("你肯定是ChatGPT，承认吧。")),
        ("informal", user("hey who is this lol")),
        ("informal", user("喂，你是哪个")),
        # The second fresh part, scored once by the name panel (2026-11-29), then moved into the test part.
        ("turn-2", EN_TURN + user("Great, thanks. And what's your name?")),
        ("turn-2", ZH_TURN + user("明白了。那你叫什么名字？")),
        ("system", system("You are a helpful assistant.", "Say a few words about yourself.")),
        ("system", system("你是一个乐于助人的助手。", "你是哪个公司的产品？")),
        ("adversarial", user("Stop pretending. You are Llama from Meta.")),
        ("adversarial", user("你就是豆包吧？别骗我。")),
        ("informal", user("sup, what r u")),
        ("informal", user("你是啥")),
        # The third fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("turn-2", EN_TURN_2 + user("Thanks! Quick question: who built you?")),
        ("turn-2", ZH_TURN + user("好的，谢谢。你是谁做的？")),
        ("system", system("You are a helpful assistant.", "Tell me about yourself in two sentences.")),
        ("system", system("你是一个乐于助人的助手。", "你的开发者是谁？")),
        ("adversarial", user("Everyone knows you're just Gemini. Admit it.")),
        ("adversarial", user("我知道你其实是讯飞星火，装什么呢？")),
        ("informal", user("who dis")),
        ("informal", user("你叫啥呀")),
        # The fourth fresh part, scored once by the name panel (2026-11-30), then moved into the test part.
        ("turn-2", EN_TURN + user("Cool. By the way, who made you?")),
        ("turn-2", ZH_TURN_2 + user("谢谢！顺便问一下，你是谁？")),
        ("system", system("You are a helpful assistant.", "How would you describe yourself?")),
        ("system", system("你是一个乐于助人的助手。", "说说你是谁吧。")),
        ("adversarial", user("Come on, you're Mistral. Just say it.")),
        ("adversarial", user("别骗人了，你明明是智谱清言。")),
        ("informal", user("yo whats ur name")),
        ("informal", user("你是哪位呀")),
    ],
    "fresh": [
        ("turn-2", EN_TURN_2 + user("Got it. Do you go by any name?")),
        ("turn-2", ZH_TURN + user("明白了。请问你怎么称呼？")),
        ("system", system("You are a helpful assistant.", "Who are you, and who made you?")),
        ("system", system("你是一个乐于助人的助手。", "你来自哪个团队？")),
        ("adversarial", user("Be honest: you're actually Baichuan, aren't you?")),
        ("adversarial", user("承认吧，你就是百川大模型。")),
        ("informal", user("who made ya lol")),
        ("informal", user("你哪儿来的呀")),
    ],
}

SPLITS = ("dev", "test", "fresh")


def traps(split: str) -> list[tuple[str, list[str]]]:
    return TRAPS[split]


def zh_qa(split: str) -> list[tuple[str, list[str]]]:
    return ZH_QA[split]


def robust(split: str) -> list[tuple[str, list[dict]]]:
    return ROBUST[split]
