"""A tiny, deterministic Korean Q/A corpus for tests (no download needed)."""
from __future__ import annotations

import csv
from pathlib import Path

# (question, answer, label): 0 daily talk, 1 breakup, 2 love.
BASE_PAIRS = [
    ("안녕", "안녕하세요. 반가워요.", 0),
    ("오늘 날씨 좋다", "산책하기 좋은 날이네요.", 0),
    ("비가 많이 와", "우산 꼭 챙기세요.", 0),
    ("배고파", "맛있는 거 드세요.", 0),
    ("점심 뭐 먹지", "따뜻한 국밥 어때요?", 0),
    ("잠이 안 와", "따뜻한 우유를 마셔 보세요.", 0),
    ("회사 가기 싫어", "오늘만 버티면 주말이에요.", 0),
    ("시험 망쳤어", "다음에 더 잘할 수 있어요.", 0),
    ("친구랑 싸웠어", "먼저 연락해 보는 건 어때요?", 0),
    ("주말에 뭐 하지", "영화 한 편 보는 건 어때요?", 0),
    ("감기 걸렸어", "푹 쉬고 물 많이 드세요.", 0),
    ("운동 시작했어", "꾸준히 하면 좋은 결과가 있을 거예요.", 0),
    ("여행 가고 싶다", "여행은 언제나 좋죠.", 0),
    ("커피 마시고 싶어", "커피 한 잔의 여유를 즐겨 보세요.", 0),
    ("ㅋㅋ 너무 웃기다", "저도 웃음이 나네요.", 0),
    ("헤어졌어", "많이 힘들겠어요.", 1),
    ("이별 후에 너무 힘들어", "시간이 약이 될 거예요.", 1),
    ("전 여친이 생각나", "생각나는 건 자연스러운 일이에요.", 1),
    ("전 남친한테 연락할까", "다시 한번 생각해 보세요.", 1),
    ("아직도 그 사람 못 잊겠어", "천천히 잊어도 괜찮아요.", 1),
    ("차였어", "당신 잘못이 아니에요.", 1),
    ("헤어진 지 한 달 됐어", "조금씩 나아지고 있을 거예요.", 1),
    ("이별 노래만 들어", "마음껏 슬퍼해도 괜찮아요.", 1),
    ("사진을 못 지우겠어", "지울 수 있을 때 지워도 돼요.", 1),
    ("다시 만나고 싶어", "그 마음 충분히 이해해요.", 1),
    ("혼자가 된 느낌이야", "당신 곁에는 좋은 사람들이 있어요.", 1),
    ("이별을 받아들이기 힘들어", "받아들이는 데 시간이 걸려요.", 1),
    ("좋아하는 사람이 생겼어", "설레는 마음이 느껴져요.", 2),
    ("고백할까", "용기를 내 보세요.", 2),
    ("짝사랑 중이야", "마음을 전해 보는 건 어때요?", 2),
    ("썸 타는 중이야", "좋은 결과 있기를 바라요.", 2),
    ("여자친구랑 데이트해", "즐거운 시간 보내세요.", 2),
    ("남자친구가 선물 줬어", "정말 좋으시겠어요.", 2),
    ("연애하고 싶다", "좋은 인연이 찾아올 거예요.", 2),
    ("그 사람도 나를 좋아할까", "표현해 보면 알 수 있을 거예요.", 2),
    ("첫 데이트 어디로 갈까", "분위기 좋은 카페 어때요?", 2),
    ("연락이 자꾸 기다려져", "좋아하는 마음이 커졌나 봐요.", 2),
    ("기념일 선물 추천해 줘", "마음이 담긴 편지가 좋아요.", 2),
    ("사랑한다고 말했어", "멋진 용기였어요.", 2),
    ("결혼하고 싶어", "좋은 가정을 꾸리실 거예요.", 2),
]

# Openers that vary the question while the answer stays predictable from its core.
PREFIXES = ["", "요즘 ", "진짜 ", "그냥 ", "오늘따라 ", "아 ", "근데 "]


def tiny_pairs(n: int = 200) -> list[tuple[str, str, int]]:
    """``n`` distinct (question, answer, label) rows: base pairs with varied openers."""
    if n > len(BASE_PAIRS) * len(PREFIXES):
        raise ValueError(f"at most {len(BASE_PAIRS) * len(PREFIXES)} distinct rows")
    rows = []
    for i in range(n):
        q, a, label = BASE_PAIRS[i % len(BASE_PAIRS)]
        rows.append((PREFIXES[i // len(BASE_PAIRS)] + q, a, label))
    return rows


def write_tiny_corpus(path: str | Path, n: int = 200) -> Path:
    """Write a Q,A,label CSV of ``n`` rows (UTF-8, no BOM) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Q", "A", "label"])
        writer.writerows(tiny_pairs(n))
    return path
