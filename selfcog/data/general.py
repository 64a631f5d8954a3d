"""Built-in general questions: preservation prompts for training, and checkable questions for evaluation.

The three sets are disjoint. PRESERVE_PROMPTS are answered by the base model itself and trained on
(self-distillation), so fine-tuning does not drag ordinary answers toward the identity. DEV and TEST
questions are never trained on; each carries the answers that count as right (any one, case-insensitive).
"""

from __future__ import annotations

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
]


def is_right(answer: str, accepted: list[str]) -> bool:
    """An answer is right when it contains any accepted answer as a word (case-insensitive)."""
    import re

    text = answer.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", text) for a in accepted)


def qa_split(split: str) -> list[tuple[str, list[str]]]:
    return {"dev": DEV_QA, "test": TEST_QA}[split]
