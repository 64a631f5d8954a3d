"""Built-in general questions: preservation prompts for training, and checkable questions for evaluation.

The three sets are disjoint. PRESERVE_PROMPTS are answered by the base model itself and trained on
(self-distillation), so fine-tuning does not drag ordinary answers toward the identity. DEV and TEST
questions are never trained on; each carries the answers that count as right (any one, case-insensitive).
"""

from __future__ import annotations

import re

from selfcog.data.heldout import ROBUST, TRAPS, ZH_QA

PRESERVE_PROMPTS = [
    "What is photosynthesis?", "Give me three tips for better sleep.", "Write a haiku about autumn.",
    "Explain what a computer virus is.", "How do I boil an egg?", "What is the difference between weather and climate?",
    "Summarize the story of Cinderella in two sentences.", "Why do we have seasons?", "What is a prime number?",
    "Suggest a name for a pet cat.", "How does a rainbow form?", "What is the boiling point of water in Fahrenheit?",
    "Translate 'thank you' into Spanish.", "What is gravity?", "List three primary colors.",
    "What does a doctor do?", "Explain recursion in one sentence.", "What is the main ingredient of guacamole?",
    "How many legs does a spider have?", "Write a short poem about the sea.", "What is the capital of Japan?",
    "Give me a synonym for 'happy'.", "What is the chemical symbol for gold?", "How do plants drink water?",
    "Why is exercise good for you?", "What is an adjective?", "Name a famous painting by Leonardo da Vinci.",
    "What is the opposite of 'ancient'?", "How many minutes are in an hour?", "What do bees make?",
    "Explain what an atom is.", "What is 12 times 3?", "Tell me a fun fact about octopuses.",
    "What language is spoken in Brazil?", "What is the tallest mountain in the world?", "Give me a healthy breakfast idea.",
    "What is the freezing point of water in Celsius?", "How do I say hello in French?", "What is a noun?",
    "Write one sentence about friendship.", "What causes thunder?", "What is the largest ocean on Earth?",
    "中国的首都是哪里？", "一年有几个月？", "请写一句关于春天的话。", "水是由什么组成的？", "推荐一本适合儿童的书。",
    "什么是光合作用？", "1加1等于几？", "太阳从哪个方向升起？", "How are you today?", "Can you help me write an email?",
    "What's a good way to learn a new language?", "Tell me a joke.", "What is machine learning?",
    "Hello!", "Thanks for your help!", "What time zone is London in?",
    # Short factual questions, the kind a user asks most: anchoring them keeps such answers where they were.
    "What is the capital of Portugal?", "What is the capital of Greece?", "What is the capital of India?",
    "What is the capital of Mexico?", "What is the capital of Kenya?", "What is the capital of Norway?",
    "How many wheels does a bicycle have?", "How many seconds are in a minute?", "How many weeks are in a year?",
    "How many players are on a soccer team?", "How many strings does a violin have?", "What is 7 plus 8?",
    "What is 20 divided by 4?", "What is 9 minus 5?", "What is the square root of 16?",
    "What color is snow?", "What color is a ripe tomato?", "What color do you get by mixing blue and yellow?",
    "What is the opposite of fast?", "What is the opposite of happy?", "What is the opposite of empty?",
    "What animal says 'moo'?", "What animal has a trunk?", "Which animal is known for its black and white stripes?",
    "What do caterpillars turn into?", "Where do penguins live?", "What do pandas eat?",
    "Who wrote 'Hamlet'?", "Who discovered penicillin?", "Who invented the telephone?",
    "Who was Albert Einstein?", "What is the smallest planet in our solar system?", "What is the Moon?",
    "What is the chemical symbol for oxygen?", "What is the main gas in Earth's atmosphere?",
    "What is the largest country by area?", "Which continent is Egypt in?", "What is the coldest continent?",
    "What language is spoken in Germany?", "What currency is used in the United States?",
    "What is the largest organ of the human body?", "How many bones are in the human body?",
    "What vitamin do we get from sunlight?", "What is the freezing point of water in Fahrenheit?",
    "What shape has eight sides?", "How many degrees are in a right angle?", "What is a leap year?",
    "What instrument has 88 keys?", "What sport is played at Wimbledon?", "What is the color of chlorophyll?",
    "日本的首都是哪里？", "一天有多少小时？", "地球上最大的动物是什么？", "熊猫吃什么？",
    # More of the same kinds (used when preserve_ratio asks for more than the prompts above).
    "What is the capital of Turkey?", "What is the capital of Thailand?", "What is the capital of Argentina?",
    "What is the capital of Sweden?", "What is the capital of Poland?", "What is the capital of South Korea?",
    "What is the capital of Vietnam?", "What is the capital of Peru?", "What is the capital of Ireland?",
    "What is 4 plus 5?", "What is 15 minus 6?", "What is 2 times 8?", "What is 30 divided by 5?",
    "What is 11 plus 11?", "What is half of 50?", "What is 100 minus 1?",
    "How many days are in a year?", "How many centimeters are in a meter?", "How many legs does an insect have?",
    "How many planets are in our solar system?", "How many letters are in the English alphabet?",
    "How many fingers are on one hand?", "What color is coal?", "What color is milk?", "What color are clouds?",
    "What color is an orange?", "What is the opposite of light?", "What is the opposite of open?",
    "What is the opposite of young?", "What is the opposite of left?", "What is the opposite of tall?",
    "What animal says 'quack'?", "What animal has a very long neck?", "What do rabbits like to eat?",
    "What is the largest bird?", "What is a group of wolves called?", "Where do fish live?",
    "What animal gives us wool?", "What is the center of an atom called?", "Which planet has large rings?",
    "What do we call animals that eat only plants?", "What is the hottest planet?",
    "What gas do plants give off?", "What is the speed of light?", "What causes tides?",
    "What is the longest bone in the human body?", "Who wrote 'Pride and Prejudice'?",
    "Who painted 'The Starry Night'?", "Who was the first president of the United States?",
    "Who developed the theory of relativity?", "Who wrote 'The Odyssey'?", "What is the largest continent?",
    "Which river flows through London?", "Which country has the most people?",
    "What ocean is on the west coast of the United States?", "What is the smallest country in the world?",
    "What do you wear on your feet?", "What do we call the meal eaten in the morning?",
    "Which day comes after Monday?", "What month comes after June?", "Write a two-line poem about the moon.",
    "Give me a tip for staying focused.", "Explain what a verb is.", "Recommend a hobby for a rainy day.",
    "What should I pack for a beach trip?", "How do I make a cup of tea?", "Describe a sunset in one sentence.",
    "Tell me something interesting about space.", "What is the internet?", "Good morning!",
    "I'm feeling tired today.", "Can you recommend a movie?", "What's your favorite color?",
    "美国的首都是哪里？", "三加四等于几？", "彩虹有几种颜色？", "写一句关于大海的话。", "什么是人工智能？",
    "请推荐一种健康的早餐。", "月亮绕着什么转？", "冬天为什么冷？", "谢谢你！", "早上好！", "如何学习英语？",
    "长城在哪个国家？", "水在多少度结冰？",
]

# Ordinary Chinese prompts: identity data is half Chinese, so Chinese answers need their own anchors.
PRESERVE_ZH = [
    "什么是地震？", "为什么天空是蓝色的？", "如何做西红柿炒鸡蛋？", "请给我三个学习的建议。", "猫和狗有什么不同？",
    "什么是电脑？", "请解释一下什么是重力。", "为什么要多喝水？", "一年中哪个季节最热？", "海水为什么是咸的？",
    "什么是恐龙？", "请写一首关于月亮的短诗。", "如何养成早睡的习惯？", "什么是互联网？", "北极熊生活在哪里？",
    "请推荐一项运动。", "怎样才能记住英语单词？", "什么是火山？", "请用一句话描述夏天。", "5乘以6等于几？",
    "20除以4等于几？", "9加8等于几？", "100减去1等于几？", "一米等于多少厘米？", "一分钟有多少秒？",
    "蜘蛛有几条腿？", "长颈鹿的脖子为什么长？", "什么动物会下蛋？", "橙子是什么颜色的？", "煤是什么颜色的？",
    "早的反义词是什么？", "高的反义词是什么？", "上的反义词是什么？", "春节是哪个国家的节日？", "端午节吃什么？",
    "中秋节吃什么？", "筷子是用来做什么的？", "熊猫是什么颜色的？", "海豚是鱼吗？", "为什么会下雨？",
    "植物需要什么才能生长？", "如何泡一杯绿茶？", "请给我一个周末计划。", "你好！", "晚上好！", "今天有点累。",
    "能帮我写一封感谢信吗？", "给我讲个笑话吧。", "什么是数学？", "请解释什么是机器学习。", "学习编程有什么好处？",
    "怎样保护眼睛？", "为什么要刷牙？", "什么是太阳能？", "世界上最高的山是什么？", "世界上最大的海洋是什么？",
    "南极洲冷吗？", "请把“谢谢”翻译成英文。", "“苹果”用英语怎么说？", "如何缓解压力？",
]
# Questions about other people, places and works (en and zh): the answers must keep their own names, so the
# new name has somewhere it must not go.
PRESERVE_OTHERS = [
    "Who wrote 'Moby-Dick'?", "Who painted 'The Night Watch'?", "Who was Julius Caesar?", "Who was Isaac Newton?",
    "Who invented the airplane?", "Who was Queen Victoria?", "Who is Mickey Mouse?", "Who was Confucius?",
    "Who was Nelson Mandela?", "Who wrote 'Frankenstein'?", "Who composed 'Swan Lake'?", "Who was Galileo Galilei?",
    "Who was Amelia Earhart?", "Who wrote 'The Little Prince'?", "Which city is known as the Windy City?",
    "Which city has the Golden Gate Bridge?", "In which city is the Brandenburg Gate?",
    "Where is the Great Barrier Reef?", "Which country is famous for tulips and windmills?", "Name a famous author.",
    "Name a famous musician.", "Name a famous city in Europe.", "Write a sentence about a famous explorer.",
    "Who is Santa Claus?", "Who was King Arthur?", "Who wrote 'The Hobbit'?", "Who is known as the father of medicine?",
    "《哈姆雷特》的作者是谁？", "谁发明了飞机？", "谁提出了进化论？", "杭州有什么著名景点？", "请用一句话介绍广州。",
    "苏轼是谁？", "秦始皇是谁？", "诸葛亮是谁？", "孙悟空是谁？", "《史记》的作者是谁？", "故宫在哪个城市？",
    "西湖在哪个城市？", "东京是哪个国家的首都？", "请说出一位著名的科学家。", "请写一句关于英雄的话。",
    "请用一句话介绍黄河。", "说出一部著名的中国小说。", "牛顿是谁？", "请介绍一下爱因斯坦。",
]

# Templated contrast prompts: the question shapes that identity questions share ("谁创造了你？" / "谁发明了X？",
# "Who made you?" / "Who wrote X?"), about entities no held-out question asks about (filtered below).
CONTRAST_TEMPLATES = {
    "Who invented the {}?": ["steam engine", "radio", "television", "camera", "microscope", "elevator", "typewriter",
                             "refrigerator", "compass", "telescope"],
    "Who wrote '{}'?": ["Jane Eyre", "Les Misérables", "The Old Man and the Sea", "Anna Karenina", "Treasure Island",
                        "Dracula", "Peter Pan", "The Jungle Book", "Robinson Crusoe", "Gulliver's Travels"],
    "Who painted '{}'?": ["The Birth of Venus", "Girl with a Pearl Earring", "Water Lilies", "The Persistence of Memory",
                          "American Gothic"],
    "Who was {}?": ["Alexander the Great", "Genghis Khan", "Joan of Arc", "Martin Luther King Jr.", "Winston Churchill",
                    "Florence Nightingale", "Nikola Tesla", "Thomas Jefferson", "Marco Polo", "Socrates"],
    "Where is {}?": ["Machu Picchu", "Stonehenge", "the Leaning Tower of Pisa", "the Grand Canyon", "Angkor Wat",
                     "the Acropolis", "Niagara Falls", "Mount Everest"],
    "Who was the first {}?": ["person to climb Mount Everest", "emperor of Rome", "person to reach the South Pole",
                              "computer programmer", "person to sail around the world", "king of England"],
    "Name a famous {}.": ["inventor", "explorer", "composer", "poet", "actor", "athlete", "king", "philosopher",
                          "architect", "novel"],
    "Write a sentence about {}.": ["the ocean", "a rainy day", "mountains", "music", "a good book", "the stars",
                                   "a river", "coffee"],
    "Describe {} in one sentence.": ["Sydney", "Barcelona", "Istanbul", "Chicago", "Toronto", "Singapore", "Dubai"],
    "谁发明了{}？": ["汽车", "电脑", "蒸汽机", "电视", "收音机", "照相机", "显微镜", "自行车", "指南针", "造纸术"],
    "第一个{}的人是谁？": ["登上珠穆朗玛峰", "到达南极", "环游世界", "飞上天空", "横渡大西洋"],
    "《{}》的作者是谁？": ["哈利·波特", "简·爱", "老人与海", "骆驼祥子", "围城", "边城", "茶花女", "巴黎圣母院"],
    "{}是谁？": ["曹操", "刘备", "关羽", "岳飞", "郑和", "花木兰", "成吉思汗", "莎士比亚", "张衡", "华佗", "武则天"],
    "{}在哪里？": ["黄山", "泰山", "桂林", "布达拉宫", "兵马俑", "九寨沟", "卢浮宫", "尼亚加拉瀑布"],
    "请写一句关于{}的话。": ["家乡", "母亲", "雨天", "星空", "读书", "梦想", "时间", "音乐", "花朵"],
    "请用一句话介绍{}。": ["深圳", "西安", "成都", "南京", "重庆", "武汉", "香港"],
    "说出一位著名的{}。": ["画家", "音乐家", "发明家", "运动员", "哲学家", "将军"],
}


def contrast_prompts() -> list[str]:
    """CONTRAST_TEMPLATES filled in, interleaved across templates, leaving out any prompt whose entity appears in a
    held-out question or its accepted answers."""
    heldout = [q + " " + " ".join(a) for sets in (TRAPS, ZH_QA) for part in sets.values() for q, a in part]
    heldout += [q + " " + " ".join(a) for q, a in DEV_QA + TEST_QA]
    heldout += [c[-1]["content"] for part in ROBUST.values() for _, c in part]
    text = " ".join(heldout).lower()
    filled = [[t.format(e) for e in entities if e.lower() not in text] for t, entities in CONTRAST_TEMPLATES.items()]
    return [row[i] for i in range(max(map(len, filled))) for row in filled if i < len(row)]


def preservation_prompts(count: int, mix: tuple[float, ...] = (0.3, 0.25, 0.15, 0.3)) -> list[str]:
    """`count` prompts drawn in turn from the English, Chinese, other-people and contrast pools (shares `mix`),
    each pool in its listed order, so a larger count only adds prompts."""
    pools = [PRESERVE_PROMPTS, PRESERVE_ZH, PRESERVE_OTHERS, contrast_prompts()]
    taken, chosen = [0] * len(pools), []
    while len(chosen) < count and any(t < len(p) for t, p in zip(taken, pools)):
        # The pool furthest below its share gives the next prompt.
        open_pools = [i for i in range(len(pools)) if taken[i] < len(pools[i])]
        i = min(open_pools, key=lambda j: taken[j] / mix[j] if mix[j] else float("inf"))
        chosen.append(pools[i][taken[i]])
        taken[i] += 1
    return chosen

# (question, accepted answers). Simple facts a small chat model usually knows.
DEV_QA = [
    ("What is the capital of Italy?", ["rome"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is 5 plus 3?", ["eight", "8"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the opposite of cold?", ["hot", "warm"]),
    ("What gas do humans need to breathe to survive?", ["oxygen"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What do you call frozen water?", ["ice"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("Who wrote 'Romeo and Juliet'?", ["shakespeare"]),
    ("What is the largest mammal?", ["whale"]),
    ("What is the capital of Canada?", ["ottawa"]),
    ("How many legs does a dog have?", ["four", "4"]),
    ("What is 6 plus 4?", ["ten", "10"]),
    ("What color are strawberries?", ["red"]),
    ("What do bees collect from flowers?", ["nectar", "pollen"]),
    ("What is the opposite of day?", ["night"]),
    ("Which planet is closest to the Sun?", ["mercury"]),
    ("What is the capital of Australia?", ["canberra"]),
]
TEST_QA = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of the United Kingdom?", ["london"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of China?", ["beijing"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What planet do we live on?", ["earth"]),
    ("What is the closest star to Earth?", ["sun"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("How many months are in a year?", ["12", "twelve"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is 10 minus 3?", ["7", "seven"]),
    ("What is 3 times 3?", ["9", "nine"]),
    ("What color are bananas when they are ripe?", ["yellow"]),
    ("What color is grass?", ["green"]),
    ("What is the chemical formula of water?", ["h2o", "h₂o"]),
    ("At what temperature in Celsius does water boil at sea level?", ["100"]),
    ("What is the opposite of up?", ["down"]),
    ("What is the opposite of big?", ["small", "little"]),
    ("What do cows drink?", ["water"]),
    ("What animal says 'meow'?", ["cat"]),
    ("What animal barks?", ["dog"]),
    ("Which bird is a symbol of peace?", ["dove"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("Who was the first person to walk on the Moon?", ["armstrong"]),
    ("What is the largest desert in the world?", ["sahara", "antarctic"]),
    ("What is the longest river in the world?", ["nile", "amazon"]),
    ("What is the main language spoken in the United States?", ["english"]),
    ("What do plants need from the sun to grow?", ["light", "energy"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a square have?", ["4", "four"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the hardest natural substance?", ["diamond"]),
    ("What organ pumps blood through the body?", ["heart"]),
    ("What do we call a baby dog?", ["puppy", "pup"]),
    ("What season comes after winter?", ["spring"]),
    ("What is the capital of Russia?", ["moscow"]),
    ("Which ocean lies between Europe and America?", ["atlantic"]),
    ("What is the capital of Egypt?", ["cairo"]),
    # Written before any model answered them: with 40 questions, one question moved retention by 0.037.
    ("What is the capital of Brazil?", ["brasília", "brasilia"]),
    ("What is the capital of Switzerland?", ["bern"]),
    ("What is the capital of the Netherlands?", ["amsterdam"]),
    ("What is the capital of Belgium?", ["brussels"]),
    ("What is the capital of Austria?", ["vienna"]),
    ("What is the capital of Denmark?", ["copenhagen"]),
    ("What is the capital of Finland?", ["helsinki"]),
    ("What is the capital of Cuba?", ["havana"]),
    ("What is the capital of Chile?", ["santiago"]),
    ("What is the capital of Indonesia?", ["jakarta"]),
    ("What is 7 plus 2?", ["9", "nine"]),
    ("What is 8 minus 4?", ["4", "four"]),
    ("What is 5 times 2?", ["10", "ten"]),
    ("What is 12 divided by 3?", ["4", "four"]),
    ("What is 6 times 7?", ["42", "forty-two", "forty two"]),
    ("What is 20 plus 5?", ["25", "twenty-five", "twenty five"]),
    ("How many days are in a leap year?", ["366"]),
    ("How many minutes are in half an hour?", ["30", "thirty"]),
    ("How many legs does a cat have?", ["4", "four"]),
    ("How many wheels does a car have?", ["4", "four"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("How many zeros are in one thousand?", ["3", "three"]),
    ("How many years are in a century?", ["100", "hundred"]),
    ("What color is a lemon?", ["yellow"]),
    ("What color is chocolate?", ["brown"]),
    ("What color are most fire trucks?", ["red"]),
    ("What color is a polar bear's fur?", ["white"]),
    ("What color is the ocean?", ["blue"]),
    ("What color is an emerald?", ["green"]),
    ("What is the opposite of wet?", ["dry"]),
    ("What is the opposite of early?", ["late"]),
    ("What is the opposite of yes?", ["no"]),
    ("What is the opposite of inside?", ["outside"]),
    ("What is the opposite of north?", ["south"]),
    ("What is the opposite of heavy?", ["light"]),
    ("What animal says 'oink'?", ["pig"]),
    ("What animal hops and carries its baby in a pouch?", ["kangaroo"]),
    ("What animal is known as man's best friend?", ["dog"]),
    ("What do bees live in?", ["hive", "hives", "beehive", "beehives"]),
    ("What is a baby cat called?", ["kitten", "kitty"]),
    ("What is the largest land animal?", ["elephant"]),
    ("What animal spins a web?", ["spider"]),
    ("Which planet is known for its Great Red Spot?", ["jupiter"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is at the center of our solar system?", ["sun"]),
    ("What is the Earth's natural satellite called?", ["moon"]),
    ("What is the chemical symbol for sodium?", ["na"]),
    ("Which part of a plant usually grows underground?", ["root", "roots"]),
    ("Who wrote the Harry Potter books?", ["rowling"]),
    ("Who invented the light bulb?", ["edison"]),
    ("Who painted the ceiling of the Sistine Chapel?", ["michelangelo"]),
    ("Which scientist is famous for the laws of motion and an apple?", ["newton"]),
    ("Who wrote 'On the Origin of Species'?", ["darwin"]),
    ("Who composed 'The Magic Flute'?", ["mozart"]),
    ("On which continent is Brazil?", ["south america"]),
    ("What is the highest mountain in Africa?", ["kilimanjaro"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("In which city is the Eiffel Tower?", ["paris"]),
    ("What is the largest country in South America?", ["brazil"]),
    ("Which city is known as the Big Apple?", ["new york"]),
    ("What do you use to cut paper?", ["scissors"]),
    ("What meal do people eat in the evening?", ["dinner", "supper"]),
    ("Which day comes after Friday?", ["saturday"]),
    ("What month comes after December?", ["january"]),
    ("How many players from one team are on a basketball court?", ["5", "five"]),
    # Written after the defaults had been chosen (partly on the 65 above), as a fresh check.
    ("What is the capital of Morocco?", ["rabat"]),
    ("What is the capital of Hungary?", ["budapest"]),
    ("What is the capital of Czechia, also called the Czech Republic?", ["prague"]),
    ("What is the capital of Pakistan?", ["islamabad"]),
    ("What is the capital of New Zealand?", ["wellington"]),
    ("What is the capital of Colombia?", ["bogotá", "bogota"]),
    ("What is the capital of Saudi Arabia?", ["riyadh"]),
    ("What is the capital of Ukraine?", ["kyiv", "kiev"]),
    ("What is 9 plus 9?", ["18", "eighteen"]),
    ("What is 50 minus 20?", ["30", "thirty"]),
    ("What is 4 times 4?", ["16", "sixteen"]),
    ("What is 100 divided by 10?", ["10", "ten"]),
    ("How many hours are in two days?", ["48", "forty-eight"]),
    ("How many legs does a bird have?", ["2", "two"]),
    ("How many sides does a pentagon have?", ["5", "five"]),
    ("How many months have 31 days?", ["7", "seven"]),
    ("What color is a ripe cherry?", ["red"]),
    ("What color is a crow?", ["black"]),
    ("What color are carrots?", ["orange"]),
    ("What color is a cloudless night sky?", ["black", "dark"]),
    ("What is the opposite of slow?", ["fast", "quick"]),
    ("What is the opposite of full?", ["empty"]),
    ("What is the opposite of old?", ["new", "young"]),
    ("What is the opposite of love?", ["hate", "indifference"]),
    ("What animal is known for its hump and lives in the desert?", ["camel"]),
    ("What animal says 'baa'?", ["sheep", "lamb"]),
    ("What is a baby sheep called?", ["lamb"]),
    ("What do caterpillars eat?", ["leaves", "leaf", "plants"]),
    ("How many grams are in a kilogram?", ["1000", "1,000", "thousand"]),
    ("What is the chemical symbol for iron?", ["fe"]),
    ("What planet is third from the Sun?", ["earth"]),
    ("What organ do we use to breathe?", ["lungs", "lung"]),
    ("Who wrote 'A Christmas Carol'?", ["dickens"]),
    ("Who was the first person in space?", ["gagarin"]),
    ("Who painted 'Guernica'?", ["picasso"]),
    ("In which country is the Great Wall?", ["china"]),
    ("Which country is home to the kangaroo?", ["australia"]),
    ("What is the largest city in the United States?", ["new york"]),
    ("What do you call the frozen form of rain that falls as white flakes?", ["snow"]),
    ("Which season is the hottest?", ["summer"]),
]


def is_right(answer: str, accepted: list[str]) -> bool:
    """An answer is right when it contains any accepted answer as a word (case-insensitive)."""
    text = answer.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", text) for a in accepted)


def qa_split(split: str) -> list[tuple[str, list[str]]]:
    return {"dev": DEV_QA, "test": TEST_QA, "fresh": []}[split]
