"""A reward under which about half of the synthetic prompts give every sample the same reward (no signal for a
group-relative advantage): DAPO's dynamic sampling must drop those groups and refill the batch (test_cli_e2e)."""


def partly_constant(prompt: str, response: str, reference: str) -> float:
    digits_asked = sum(c.isdigit() for c in prompt)
    if digits_asked % 2:  # 'Say some digits: 4 8 2' asks for 3: every sample of such a prompt scores 0
        return 0.0
    return sum(c.isdigit() for c in response) / max(len(response), 1)
