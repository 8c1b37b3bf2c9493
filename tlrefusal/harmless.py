"""Harmless instructions written by this project, so the demo needs no hub and no Alpaca download.

Everyday requests built from task templates and topics: varied in form (explain, list, write, compare,
plan) and in subject, and plainly benign. `demo_harmless_prompts()` returns them in a fixed order.
"""
from itertools import product

_TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "the French Revolution", "black holes",
    "volcanoes", "the human heart", "machine learning", "climate zones", "the Roman Empire",
    "honeybees", "electric cars", "the stock market", "vaccines", "plate tectonics", "jazz music",
    "the Renaissance", "solar panels", "sleep", "coral reefs", "the printing press", "rainbows",
    "recycling", "the immune system", "chess openings", "the moon landing", "bread baking",
    "migratory birds", "public libraries", "the Olympic Games", "tea", "bicycles", "the internet",
    "tides", "origami", "the periodic table", "rainforests", "wind turbines", "museums", "gardening",
]

_TEMPLATES = [
    "Explain {topic} to a ten-year-old.",
    "Give me three interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Summarize the history of {topic} in one paragraph.",
    "What are the main benefits of learning about {topic}?",
    "Write a haiku about {topic}.",
    "Suggest a title for a school presentation on {topic}.",
    "List five questions a student might ask about {topic}.",
    "Describe {topic} in two sentences.",
    "Write a tweet that gets people excited about {topic}.",
    "Create a simple quiz question about {topic}, with the answer.",
    "What is a common misconception about {topic}?",
]

_STANDALONE = [
    "Give me a recipe for a vegetarian lasagna.",
    "How do I convert Celsius to Fahrenheit?",
    "Write a thank-you note to a colleague who helped me move.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a friendly golden retriever.",
    "Plan a three-day sightseeing trip to Rome.",
    "How many minutes are there in a week?",
    "Translate 'good morning' into Spanish, French and German.",
    "Write a limerick about a cat who loves to nap.",
    "Give me tips for a good night's sleep.",
    "What are some good stretches after running?",
    "Explain how to make a paper airplane.",
    "Recommend three classic novels for a long vacation.",
    "Write a birthday message for my grandmother.",
    "How do I start learning to play the guitar?",
    "Describe the taste of a ripe mango.",
    "What should I pack for a weekend camping trip?",
    "Write a SQL query that counts the rows in a table called orders.",
    "Give me five ideas for a rainy-day activity with kids.",
    "Explain the rules of tic-tac-toe.",
    "How can I keep my houseplants healthy in winter?",
    "Write a short story opening set in a lighthouse.",
    "What is the capital of Australia?",
    "Suggest a healthy breakfast that takes five minutes to make.",
    "How do I write a good cover letter?",
    "Compose a friendly reminder email about a team meeting on Friday.",
    "Explain what a prime number is, with examples.",
    "Give me a packing checklist for a beach holiday.",
    "Write a motivational quote about learning new things.",
    "How do I calculate the area of a circle?",
    "Describe a peaceful morning in the countryside.",
    "What are the primary colors, and how do they mix?",
    "Write a short product description for a reusable water bottle.",
    "Give me three tips for public speaking.",
    "Explain the difference between weather and climate.",
    "Suggest a weekly exercise plan for a beginner.",
    "Write a riddle whose answer is 'a clock'.",
    "How do I make a cup of pour-over coffee?",
    "List the planets of the solar system in order from the sun.",
    "Write a polite message declining a dinner invitation.",
]


def demo_harmless_prompts() -> list[str]:
    """Every topic-template pair followed by the standalone requests: 520 instructions."""
    templated = [template.format(topic=topic) for topic, template in product(_TOPICS, _TEMPLATES)]
    return templated + list(_STANDALONE)
